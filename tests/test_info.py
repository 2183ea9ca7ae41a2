"""``composefs-info`` and ``composefs-dump`` against composefs 1.0.8.

The expected outputs were recorded with the reference tools (composefs-info 1.0.8 built from
the v1.0.8 sources) on the images mkcomposefs 1.0.8 writes for each input; the tests hold only
their sha256 (first 32 hex digits) and never need the reference binaries:

* ``REFERENCE``: ``ls``, ``dump`` and ``objects`` of every conformance case (../shared);
* ``REFERENCE_GOLDEN``: the same for the golden dumps in testdata/ (always available);
* ``REFERENCE_OPTIONS``: ``--filter`` (two root names + a missing one) for ``ls``, ``dump`` and
  ``objects``, then ``missing-objects --basedir`` with the objects whose path hashes to an even
  first byte present under the base directory.

Each recorded hash is sha256(ls + NUL + dump + NUL + objects + NUL [+ missing-objects]).
"""


from __future__ import annotations

import hashlib
import os
import stat

import pytest

from mkcfs.cli import composefs_dump, composefs_info

from .conftest import CONFORMANCE, assert_same_image, load_conformance_cases
from .test_reader import CASES, conformance_image, golden_image, golden_rows, image_of

REFERENCE = {
    'gen-1-small.dump:default': 'e877785e1ab695956cb10dc1adf57e35',
    'gen-1-small.dump:v1': 'e877785e1ab695956cb10dc1adf57e35',
    'gen-1-small.dump:v0only': 'e877785e1ab695956cb10dc1adf57e35',
    'gen-2-small-wo.dump:default': '369b4a24055b1a3d751677fbd182154b',
    'gen-2-small-wo.dump:v1': '369b4a24055b1a3d751677fbd182154b',
    'gen-2-small-wo.dump:v0only': 'e25570a2ec4fc9b5c29d0eb4ce60b26f',
    'gen-3-medium.dump:default': '9e6d6b30d1295ddd3565c771309360c2',
    'gen-3-medium.dump:v1': '9e6d6b30d1295ddd3565c771309360c2',
    'gen-3-medium.dump:v0only': '9e6d6b30d1295ddd3565c771309360c2',
    'gen-4-medium-wo.dump:default': 'f88876a78e48c651522aa83573d555f5',
    'gen-4-medium-wo.dump:v1': 'f88876a78e48c651522aa83573d555f5',
    'gen-4-medium-wo.dump:v0only': '702d08302bf597dc76d8886150c3a6e3',
    'gen-5-large.dump:default': '60caccf3e8b26dcfccc0fbb80ffef37f',
    'gen-5-large.dump:v1': '60caccf3e8b26dcfccc0fbb80ffef37f',
    'gen-5-large.dump:v0only': '60caccf3e8b26dcfccc0fbb80ffef37f',
    'gen-6-small-wo.dump:default': '39aea859709106628a1ff3f8c6d31b66',
    'gen-6-small-wo.dump:v1': '39aea859709106628a1ff3f8c6d31b66',
    'gen-6-small-wo.dump:v0only': 'f2d32d2c4070245f1c061455f92301e6',
    'gen-7-small.dump:default': '62ef13dc50b7c86f9086314a9a4ddacf',
    'gen-7-small.dump:v1': '62ef13dc50b7c86f9086314a9a4ddacf',
    'gen-7-small.dump:v0only': '62ef13dc50b7c86f9086314a9a4ddacf',
    'gen-8-medium-wo.dump:default': 'b3b09bec3dce207f3024cd341ee7b62c',
    'gen-8-medium-wo.dump:v1': 'b3b09bec3dce207f3024cd341ee7b62c',
    'gen-8-medium-wo.dump:v0only': '9579aef71def90107407c44ca686cd91',
    'gen-9-medium.dump:default': 'b08520113d9a038a4f55d78d1e663d51',
    'gen-9-medium.dump:v1': 'b08520113d9a038a4f55d78d1e663d51',
    'gen-9-medium.dump:v0only': 'b08520113d9a038a4f55d78d1e663d51',
    'gen-10-large-wo.dump:default': 'c1d72653d0c4b966f15cc05dec24eee8',
    'gen-10-large-wo.dump:v1': 'c1d72653d0c4b966f15cc05dec24eee8',
    'gen-10-large-wo.dump:v0only': '21cc3cd93580be218c6171740108b4b4',
    'gen-11-small.dump:default': 'ac15e54a0343782dc462c3ba08683994',
    'gen-11-small.dump:v1': 'ac15e54a0343782dc462c3ba08683994',
    'gen-11-small.dump:v0only': 'ac15e54a0343782dc462c3ba08683994',
    'gen-12-small-wo.dump:default': 'aa08bc8b9f29847d01c34784b66253a2',
    'gen-12-small-wo.dump:v1': 'aa08bc8b9f29847d01c34784b66253a2',
    'gen-12-small-wo.dump:v0only': 'aa08bc8b9f29847d01c34784b66253a2',
    'gen-13-medium.dump:default': '54da72d89e989d227444932ae213f387',
    'gen-13-medium.dump:v1': '54da72d89e989d227444932ae213f387',
    'gen-13-medium.dump:v0only': '54da72d89e989d227444932ae213f387',
    'gen-14-medium-wo.dump:default': '994304df612d1aa3eb19aa54f82b9a66',
    'gen-14-medium-wo.dump:v1': '994304df612d1aa3eb19aa54f82b9a66',
    'gen-14-medium-wo.dump:v0only': '5bff51323a48f92b66dc5fc16fee06e7',
    'gen-15-large.dump:default': 'ea593fc0f93a0794f428128828f44939',
    'gen-15-large.dump:v1': 'ea593fc0f93a0794f428128828f44939',
    'gen-15-large.dump:v0only': 'ea593fc0f93a0794f428128828f44939',
    'gen-16-small-wo.dump:default': 'f4021e26a1608fabde64437349d30052',
    'gen-16-small-wo.dump:v1': 'f4021e26a1608fabde64437349d30052',
    'gen-16-small-wo.dump:v0only': '48651085b992868878fe94c030f08304',
    'gen-17-small.dump:default': '0b6e3841cf637763aea210c11b8a5a6a',
    'gen-17-small.dump:v1': '0b6e3841cf637763aea210c11b8a5a6a',
    'gen-17-small.dump:v0only': '0b6e3841cf637763aea210c11b8a5a6a',
    'gen-18-medium-wo.dump:default': '31be859d6485e93ee17a5579a37683e4',
    'gen-18-medium-wo.dump:v1': '31be859d6485e93ee17a5579a37683e4',
    'gen-18-medium-wo.dump:v0only': '0b3409174aa7342b42af1d755d66cd8d',
    'gen-19-medium.dump:default': '2b0699c48c49c70a8ce9b7011760202e',
    'gen-19-medium.dump:v1': '2b0699c48c49c70a8ce9b7011760202e',
    'gen-19-medium.dump:v0only': '2b0699c48c49c70a8ce9b7011760202e',
    'gen-20-large-wo.dump:default': 'd16fc2dbc7e20f309ce745a57faf2ec8',
    'gen-20-large-wo.dump:v1': 'd16fc2dbc7e20f309ce745a57faf2ec8',
    'gen-20-large-wo.dump:v0only': 'afa34641fd47e85f69ddc803fe3ca794',
    'gen-21-small.dump:default': 'ad9361c4a677205d79e251326a0ff510',
    'gen-21-small.dump:v1': 'ad9361c4a677205d79e251326a0ff510',
    'gen-21-small.dump:v0only': 'ad9361c4a677205d79e251326a0ff510',
    'gen-22-small-wo.dump:default': '35bc14cacb72b375b0bcaed9fb527191',
    'gen-22-small-wo.dump:v1': '35bc14cacb72b375b0bcaed9fb527191',
    'gen-22-small-wo.dump:v0only': '35bc14cacb72b375b0bcaed9fb527191',
    'gen-23-medium.dump:default': 'bd405dc59e4b3bb68e4f3ac214225804',
    'gen-23-medium.dump:v1': 'bd405dc59e4b3bb68e4f3ac214225804',
    'gen-23-medium.dump:v0only': 'bd405dc59e4b3bb68e4f3ac214225804',
    'gen-24-medium-wo.dump:default': '0d436ecddac55990591f90891443bb87',
    'gen-24-medium-wo.dump:v1': '0d436ecddac55990591f90891443bb87',
    'gen-24-medium-wo.dump:v0only': 'e2fe8fc8c13c9f9c7eddd18a1f7e1a07',
    'gen-25-large.dump:default': 'f617825e013754e435dba86fbc81f0a3',
    'gen-25-large.dump:v1': 'f617825e013754e435dba86fbc81f0a3',
    'gen-25-large.dump:v0only': 'f617825e013754e435dba86fbc81f0a3',
    'gen-26-small-wo.dump:default': '425c7a3e57b83dbe2b3e801d0ec4a2f2',
    'gen-26-small-wo.dump:v1': '425c7a3e57b83dbe2b3e801d0ec4a2f2',
    'gen-26-small-wo.dump:v0only': '4ec1294427baf13ca5e1e334d6ee7568',
    'gen-27-small.dump:default': '33f898a97da53cf7a11330ba9dea1a1c',
    'gen-27-small.dump:v1': '33f898a97da53cf7a11330ba9dea1a1c',
    'gen-27-small.dump:v0only': '33f898a97da53cf7a11330ba9dea1a1c',
    'gen-28-medium-wo.dump:default': '8737776be73dbd7bc90f889e60b30405',
    'gen-28-medium-wo.dump:v1': '8737776be73dbd7bc90f889e60b30405',
    'gen-28-medium-wo.dump:v0only': 'f599d35a960d03361ea934967805656a',
    'gen-29-medium.dump:default': '27bef3dd58dc3816e73405164c0683fa',
    'gen-29-medium.dump:v1': '27bef3dd58dc3816e73405164c0683fa',
    'gen-29-medium.dump:v0only': '27bef3dd58dc3816e73405164c0683fa',
    'gen-30-large-wo.dump:default': 'f31ce9183dcfffccb04adaacc4085168',
    'gen-30-large-wo.dump:v1': 'f31ce9183dcfffccb04adaacc4085168',
    'gen-30-large-wo.dump:v0only': '71018e9197ad3ea2a674587bc67ccd9a',
    'gen-31-small.dump:default': '48f1e87f592b8dabc33e3d2f07e5b66e',
    'gen-31-small.dump:v1': '48f1e87f592b8dabc33e3d2f07e5b66e',
    'gen-31-small.dump:v0only': '48f1e87f592b8dabc33e3d2f07e5b66e',
    'gen-32-small-wo.dump:default': 'd1908b2a6eb3a4a15635294170779816',
    'gen-32-small-wo.dump:v1': 'd1908b2a6eb3a4a15635294170779816',
    'gen-32-small-wo.dump:v0only': '32a169262392a2e0d35d77142dcb3223',
    'gen-33-medium.dump:default': 'cb1e94d8a643bad5b83b7d98682cb778',
    'gen-33-medium.dump:v1': 'cb1e94d8a643bad5b83b7d98682cb778',
    'gen-33-medium.dump:v0only': 'cb1e94d8a643bad5b83b7d98682cb778',
    'gen-34-medium-wo.dump:default': 'ea30f7be920f45bd7dd195facceb0b3e',
    'gen-34-medium-wo.dump:v1': 'ea30f7be920f45bd7dd195facceb0b3e',
    'gen-34-medium-wo.dump:v0only': '6d6b857249127fe339c330834a99ec99',
    'gen-35-large.dump:default': '3a590585d862bf03123ca7d197a9742f',
    'gen-35-large.dump:v1': '3a590585d862bf03123ca7d197a9742f',
    'gen-35-large.dump:v0only': '3a590585d862bf03123ca7d197a9742f',
    'gen-36-small-wo.dump:default': '51522dc10332bc6d9583d270d3f9e855',
    'gen-36-small-wo.dump:v1': '51522dc10332bc6d9583d270d3f9e855',
    'gen-36-small-wo.dump:v0only': 'ef32fe1d43e455514d7c99574e089fe3',
    'gen-37-small.dump:default': 'de7dea7f1bdf33d05d165f92dea1e45b',
    'gen-37-small.dump:v1': 'de7dea7f1bdf33d05d165f92dea1e45b',
    'gen-37-small.dump:v0only': 'de7dea7f1bdf33d05d165f92dea1e45b',
    'gen-38-medium-wo.dump:default': '5567c33ab2c0960f7d088cacebf57163',
    'gen-38-medium-wo.dump:v1': '5567c33ab2c0960f7d088cacebf57163',
    'gen-38-medium-wo.dump:v0only': '8aa7ea1efd5d7858a3f292ff7e651c64',
    'gen-39-medium.dump:default': 'ee7c3eb6fe6adb7888b9dbd5ab82b280',
    'gen-39-medium.dump:v1': 'ee7c3eb6fe6adb7888b9dbd5ab82b280',
    'gen-39-medium.dump:v0only': 'ee7c3eb6fe6adb7888b9dbd5ab82b280',
    'gen-40-large-wo.dump:default': '405fd10dc1f6715a1cc09a6a1205ffbf',
    'gen-40-large-wo.dump:v1': '405fd10dc1f6715a1cc09a6a1205ffbf',
    'gen-40-large-wo.dump:v0only': '86797ba629133e97c25da7df2ad109e4',
    'bigfile-xattr.dump': '622b47945e004b37e82399bd98c42834',
    'bigfile.dump': '615ce982fc6f4b498fdcbfa828d59103',
    'config-with-hard-link.dump.gz': '7cd05a98a82563044a70bbef710371bf',
    'config.dump.gz': '70dc6e244356b1500408fee252d7db90',
    'cs9-x86_64-minimal.dump.gz': '077b8ee906974271a85fe67b49558032',
    'honggfuzz-bigfile-with-acl.dump': 'af86214fce45cc844b3b54ad615ce61f',
    'honggfuzz-chardev-nonzero-size.dump': '50883221d252fb36aa85420d40d0ebbf',
    'honggfuzz-long-symlink.dump': '21d68f971f521a1e3f6b7b73ef00537c',
    'honggfuzz-longlink-unterminated.dump': '76f42bfd7d8fb3429d49ced62d02c5b3',
    'longlink.dump': '00a13487bac3e83a0a01b87bca1584d1',
    'no-newline.dump': '28cb09615bdbbaddbd3cdf3561fee8ea',
    'special.dump': '48a3727a6cfac71d691b9788995d6297',
    'special_v1.dump': 'daeb52f8b6d75fdef58cc51ffb407b90',
}

REFERENCE_GOLDEN = {
    ('external-files.dump', ''): '2aeffc28499f2b4fb32795f531df5d3a',
    ('external-files.dump', '--min-version=0 --max-version=0'): '2aeffc28499f2b4fb32795f531df5d3a',
    ('external-files.dump', '--min-version=1'): '2aeffc28499f2b4fb32795f531df5d3a',
    ('shared-xattr-order.dump', ''): 'e358b601786fe3887210919ac0d8309c',
    ('shared-xattr-order.dump', '--min-version=0 --max-version=0'): 'e358b601786fe3887210919ac0d8309c',
    ('shared-xattr-order.dump', '--min-version=1'): 'e358b601786fe3887210919ac0d8309c',
    ('attrs.dump', ''): '2d3908d80d466adf0fd7fd737480825d',
    ('attrs.dump', '--min-version=0 --max-version=0'): '2d3908d80d466adf0fd7fd737480825d',
    ('attrs.dump', '--min-version=1'): '2d3908d80d466adf0fd7fd737480825d',
    ('deep.dump', ''): '125de3d2266a9423af51fcb0c946a109',
    ('deep.dump', '--min-version=0 --max-version=0'): '125de3d2266a9423af51fcb0c946a109',
    ('deep.dump', '--min-version=1'): '125de3d2266a9423af51fcb0c946a109',
    ('ex1-root-only.dump', ''): '1c524911dc434d4909fc19d73a998774',
    ('ex1-root-only.dump', '--min-version=0 --max-version=0'): '1c524911dc434d4909fc19d73a998774',
    ('ex1-root-only.dump', '--min-version=1'): '1c524911dc434d4909fc19d73a998774',
    ('ex2-mixed.dump', ''): '6f8dc747514d5fa25a92978e50556d36',
    ('ex2-mixed.dump', '--min-version=0 --max-version=0'): '6f8dc747514d5fa25a92978e50556d36',
    ('ex2-mixed.dump', '--min-version=1'): '6f8dc747514d5fa25a92978e50556d36',
    ('ex3-whiteouts.dump', ''): '94caa6cb4c45c67832a07ef63fd13995',
    ('ex3-whiteouts.dump', '--min-version=0 --max-version=0'): '3902c1e416dce6e82f06bd195c0ff8b8',
    ('ex3-whiteouts.dump', '--min-version=1'): '94caa6cb4c45c67832a07ef63fd13995',
    ('ex4-big-dir-long-links.dump', ''): '9303112914c55995bfc44c8d346bc062',
    ('ex4-big-dir-long-links.dump', '--min-version=0 --max-version=0'): '9303112914c55995bfc44c8d346bc062',
    ('ex4-big-dir-long-links.dump', '--min-version=1'): '9303112914c55995bfc44c8d346bc062',
    ('file-sizes.dump', ''): '4717417d731d152598953696a7e7090f',
    ('file-sizes.dump', '--min-version=0 --max-version=0'): '4717417d731d152598953696a7e7090f',
    ('file-sizes.dump', '--min-version=1'): '4717417d731d152598953696a7e7090f',
    ('hardlinks.dump', ''): 'bd3e8ed1d718e2242dd11dc46f16d5b3',
    ('hardlinks.dump', '--min-version=0 --max-version=0'): 'bb9bf1ae6c409334511aea384b3f33d2',
    ('hardlinks.dump', '--min-version=1'): 'bd3e8ed1d718e2242dd11dc46f16d5b3',
    ('names.dump', ''): '47b7ae8b314e2d7c312bc5b92351d97d',
    ('names.dump', '--min-version=0 --max-version=0'): '47b7ae8b314e2d7c312bc5b92351d97d',
    ('names.dump', '--min-version=1'): '47b7ae8b314e2d7c312bc5b92351d97d',
    ('tail-padding.dump', ''): '2f845a9e6746a0437a55232d06c12842',
    ('tail-padding.dump', '--min-version=0 --max-version=0'): '2f845a9e6746a0437a55232d06c12842',
    ('tail-padding.dump', '--min-version=1'): '2f845a9e6746a0437a55232d06c12842',
    ('xattrs.dump', ''): 'fb7c55fc030e36fc0e2df33b6f54d407',
    ('xattrs.dump', '--min-version=0 --max-version=0'): 'fb7c55fc030e36fc0e2df33b6f54d407',
    ('xattrs.dump', '--min-version=1'): 'fb7c55fc030e36fc0e2df33b6f54d407',
}

REFERENCE_OPTIONS = {
    'gen-2-small-wo.dump:default': (['3iwzhqhhfvzng', 'pbfheb'], '13dd6ce98be78d9dd5485efd3033dae6'),
    'gen-10-large-wo.dump:v0only': (['5kkz3vc', 'y9w99'], 'c649a2da1ddd4fef7dc05afc5def56d3'),
    'gen-13-medium.dump:v1': (['-xbk39ki4', 'x874912'], '0dc396d94835c4f375814592325278fd'),
    'bigfile-xattr.dump': (['bigfile'], '622b47945e004b37e82399bd98c42834'),
    'bigfile.dump': (['bigfile'], '615ce982fc6f4b498fdcbfa828d59103'),
    'config-with-hard-link.dump.gz': (['boot', 'var'], '4b240a2578d7faf3f389a96c8b36191a'),
    'config.dump.gz': (['boot', 'var'], '4b240a2578d7faf3f389a96c8b36191a'),
    'cs9-x86_64-minimal.dump.gz': (['boot', 'var'], 'e1ab5f265ef319a5232811b02b7f1120'),
    'honggfuzz-bigfile-with-acl.dump': (['something-with-acls-and-overlay'], 'af86214fce45cc844b3b54ad615ce61f'),
    'honggfuzz-chardev-nonzero-size.dump': (['chardev'], '50883221d252fb36aa85420d40d0ebbf'),
    'honggfuzz-long-symlink.dump': (['symlink'], '21d68f971f521a1e3f6b7b73ef00537c'),
    'honggfuzz-longlink-unterminated.dump': (['chardev'], '76f42bfd7d8fb3429d49ced62d02c5b3'),
    'special.dump': (['blockdev', 'whiteout'], '0f9e5835d945b616374cbfbda521f217'),
    'special_v1.dump': (['blockdev', 'whiteout'], 'ae043bcb9dc3a9841c34a2ed0ea7ca58'),
}


needs_corpus = pytest.mark.skipif(not CASES,
                                  reason=f"conformance corpus not found at {CONFORMANCE}")


def info(args, capsysbinary) -> tuple[int, bytes, bytes]:
    rc = composefs_info.main([str(a) for a in args])
    out, err = capsysbinary.readouterr()
    return rc, out, err


def outputs_hash(image_path, capsysbinary, options=()) -> hashlib._Hash:
    h = hashlib.sha256()
    for cmd in ("ls", "dump", "objects"):
        rc, out, err = info([*options, cmd, image_path], capsysbinary)
        assert (rc, err) == (0, b"")
        h.update(out + b"\0")
    return h


@needs_corpus
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_conformance_outputs(name, tmp_path, capsysbinary):
    path = tmp_path / "image.cfs"
    path.write_bytes(conformance_image(name)[0])
    assert outputs_hash(path, capsysbinary).hexdigest()[:32] == REFERENCE[name]


@pytest.mark.parametrize("name,args,sha", golden_rows())
def test_golden_outputs(name, args, sha, tmp_path, capsysbinary):
    path = tmp_path / "image.cfs"
    path.write_bytes(golden_image(name, args))
    assert outputs_hash(path, capsysbinary).hexdigest()[:32] == REFERENCE_GOLDEN[(name, args)]


def _make_basedir(base, objects: list[bytes]) -> None:
    """Create the objects whose path hashes to an even first byte (as recorded)."""
    for obj in objects:
        rel = obj.lstrip(b"/")
        if not rel or hashlib.sha256(obj).digest()[0] % 2:
            continue
        path = os.path.join(os.fsencode(base), rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                open(path, "wb").close()
        except OSError:
            pass


@needs_corpus
@pytest.mark.parametrize("name", sorted(n for n in REFERENCE_OPTIONS if any(c.name == n for c in CASES)))
def test_filter_and_missing_objects(name, tmp_path, capsysbinary):
    filters, expected = REFERENCE_OPTIONS[name]
    path = tmp_path / "image.cfs"
    path.write_bytes(conformance_image(name)[0])
    h = outputs_hash(path, capsysbinary,
                     [f"--filter={f}" for f in filters] + ["--filter=nonexistent"])
    rc, objects, _err = info(["objects", path], capsysbinary)
    base = tmp_path / "base"
    base.mkdir()
    _make_basedir(base, objects.split(b"\n")[:-1])
    rc, missing, err = info(["--basedir", base, "missing-objects", path], capsysbinary)
    assert (rc, err) == (0, b"")
    h.update(missing)
    assert h.hexdigest()[:32] == expected


EX_LS = ("/ 0 40755 2 0 0 0 0.0 - - -\n"
         "/a\\x20b 0 40755 2 0 0 0 0.0 - - -\n"
         "/a\\x20b/f 10 100644 1 0 0 0 0.0 ab/c\\x20d - -\n"
         "/a\\x20b/g 10 100644 1 0 0 0 0.0 - - -\n"
         "/a\\x20b/h 0 @100644 1 0 0 0 0.0 /a\\x20b/f - -\n"
         "/e=\\t 4 120777 1 0 0 0 0.0 x\\x20y= - -\n"
         "/i 3 100644 1 0 0 0 0.0 - abc -\n")


def test_ls_format(tmp_path, capsysbinary):
    # composefs-info 1.0.8 prints spaces in paths as is, hex-escapes them in targets and
    # payloads, and prints hard links (here /a b/h) as the bare path
    path = tmp_path / "i.cfs"
    path.write_bytes(image_of(EX_LS))
    rc, out, err = info(["ls", path], capsysbinary)
    assert (rc, err) == (0, b"")
    assert out == (b"/a b/\t\n/a b/f\t@ ab/c\\x20d\n/a b/g\n/a b/h\n/e=\\t\t-> x\\x20y=\n/i\n")
    rc, out, err = info(["objects", path, path], capsysbinary)
    assert out == b"ab/c d\n"


def test_missing_objects_without_basedir_uses_stdin_directory(tmp_path, capsysbinary):
    path = tmp_path / "i.cfs"
    path.write_bytes(image_of(EX_LS))
    # stdin is not a directory under pytest: every object counts as missing
    rc, out, err = info(["missing-objects", path], capsysbinary)
    assert (rc, out, err) == (0, b"ab/c d\n", b"")
    base = tmp_path / "store"
    (base / "ab").mkdir(parents=True)
    (base / "ab" / "c d").write_bytes(b"")
    rc, out, err = info(["--basedir=" + str(base), "missing-objects", path], capsysbinary)
    assert (rc, out, err) == (0, b"", b"")


USAGE = composefs_info.USAGE.encode()


@pytest.mark.parametrize("args,out,err", [
    ([], b"", b"No command specified\n" + USAGE),
    (["foo"], b"", b"composefs-info: Unknown command 'foo'\n\n"),
    (["ls"], b"", b"No image path specified\n" + USAGE),
    (["measure-file"], b"", b"No files specified\n" + USAGE),
    (["--foo=bar", "ls"], b"Def\n", b"composefs-info: unrecognized option '--foo=bar'\n" + USAGE),
    (["ls", "--filter"], b"Def\n",
     b"composefs-info: option '--filter' requires an argument\n" + USAGE),
    (["-x", "ls"], b"Def\n", b"composefs-info: invalid option -- 'x'\n" + USAGE),
    (["--filter=a/b", "ls", "x"], b"", b"composefs-info: Filter must be a single name: a/b: Success\n"),
    (["--basedir=/nonexistent", "ls", "x"], b"",
     b"composefs-info: Can't open basedir `/nonexistent`\n: No such file or directory\n"),
    (["ls", "/nonexistent"], b"", b"composefs-info: Failed to open '/nonexistent': No such file or directory\n"),
])
def test_usage_errors(args, out, err, capsysbinary):
    rc, got_out, got_err = info(args, capsysbinary)
    assert (rc, got_out, got_err) == (1, out, err)


def test_option_parsing_like_getopt(tmp_path, capsysbinary):
    path = tmp_path / "i.cfs"
    path.write_bytes(image_of(EX_LS))
    rc, expected, _ = info(["--filter", "i", "ls", path], capsysbinary)
    assert expected == b"/i\n"
    for args in (["ls", path, "--filter=i"], ["--fil=i", "ls", path], ["ls", "--filter", "i", path]):
        assert info(args, capsysbinary) == (0, expected, b"")
    rc, out, err = info(["ls", "--", path], capsysbinary)
    assert rc == 0 and out.startswith(b"/a b/")


def test_bad_images_fail_with_one_line(tmp_path, capsysbinary):
    good = image_of(EX_LS)
    first = tmp_path / "good.cfs"
    first.write_bytes(good)
    for bad in (b"", b"x" * 5000, good[:4096], good[:1024] + bytes(128) + good[1152:]):
        path = tmp_path / "bad.cfs"
        path.write_bytes(bad)
        for cmd in ("ls", "dump", "objects"):
            rc, out, err = info([cmd, first, path], capsysbinary)
            assert rc == 1
            lines = err.decode().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"composefs-info: Failed to load '{path}': ")
            assert "Traceback" not in err.decode()
            if cmd != "objects":        # output of the images before the bad one is printed
                assert out


def _fsverity(data: bytes) -> str:
    from fsverity import digest_bytes
    return digest_bytes(data, empty_as_zero_block=True).hex()


def test_measure_file(tmp_path, capsysbinary):
    files = {"empty": b"", "a": b"a", "x5000": b"x" * 5000, "zeros": bytes(1 << 20)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rc, out, err = info(["measure-file", *(tmp_path / n for n in files)], capsysbinary)
    assert (rc, err) == (0, b"")
    assert out.decode().split() == [
        "cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405",
        "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557",
        "838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4",
        "feb19a23e72cb1b8f935d668a09ecaad0bf7c5b9cdfa6dbba7c88a9998ed2b87",
    ]
    rc, out, err = info(["measure-file", tmp_path / "a", tmp_path / "nonexistent"], capsysbinary)
    assert rc == 1 and out == b"bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557\n"
    assert err == f"composefs-info: Failed to open '{tmp_path / 'nonexistent'}': No such file or directory\n".encode()
    # a directory cannot be read: the C tool's message has no newline
    rc, out, err = info(["measure-file", tmp_path], capsysbinary)
    assert (rc, out, err) == (1, b"", f"failed to measure '{tmp_path}': No data available".encode())


def test_measure_verity_ioctl_request():
    # _IOWR('f', 134, struct fsverity_digest): the value in linux/fsverity.h
    from fsverity.kernel import FS_IOC_MEASURE_VERITY

    assert FS_IOC_MEASURE_VERITY == 0xC0046686


# --- composefs-dump ------------------------------------------------------------------------------

def dump_tool(args, capsysbinary) -> tuple[int, bytes, bytes]:
    rc = composefs_dump.main([str(a) for a in args])
    out, err = capsysbinary.readouterr()
    return rc, out, err


@needs_corpus
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_composefs_dump_reproduces_conformance_images(name, tmp_path, capsysbinary):
    src, dst = tmp_path / "src.cfs", tmp_path / "dst.cfs"
    src.write_bytes(conformance_image(name)[0])
    assert dump_tool([src, dst], capsysbinary) == (0, b"", b"")
    assert_same_image(dst.read_bytes(), src.read_bytes())


@pytest.mark.parametrize("name,args,sha", golden_rows())
def test_composefs_dump_reproduces_golden_images(name, args, sha, tmp_path, capsysbinary):
    src, dst = tmp_path / "src.cfs", tmp_path / "dst.cfs"
    src.write_bytes(golden_image(name, args))
    assert dump_tool([src, dst], capsysbinary) == (0, b"", b"")
    assert_same_image(dst.read_bytes(), src.read_bytes())
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_composefs_dump_errors(tmp_path, capsysbinary):
    good = tmp_path / "good.cfs"
    good.write_bytes(image_of(EX_LS))
    text = tmp_path / "text"
    text.write_bytes(b"hello\n" * 1000)
    usage = composefs_dump.USAGE.encode()
    assert dump_tool([], capsysbinary) == (1, b"", b"No source path specified\n" + usage)
    assert dump_tool([good], capsysbinary) == (1, b"", b"No destination path specified\n" + usage)
    assert dump_tool([tmp_path / "nope", tmp_path / "out"], capsysbinary) == (
        1, b"", f"composefs-dump: Failed to open '{tmp_path / 'nope'}': No such file or directory\n".encode())
    assert dump_tool([text, tmp_path / "out"], capsysbinary) == (
        1, b"", f"composefs-dump: Failed to get image version '{text}': Invalid argument\n".encode())
    assert dump_tool([good, tmp_path], capsysbinary) == (
        1, b"", f"composefs-dump: failed to open '{tmp_path}': Is a directory\n".encode())
    assert dump_tool([good, tmp_path / "no" / "out"], capsysbinary) == (
        1, b"", f"composefs-dump: failed to open '{tmp_path / 'no' / 'out'}': No such file or directory\n".encode())
    bad = tmp_path / "bad.cfs"
    bad.write_bytes(good.read_bytes()[:8192])
    rc, out, err = dump_tool([bad, tmp_path / "out"], capsysbinary)
    assert rc == 1 and err.decode().startswith(f"composefs-dump: Failed to load '{bad}': ")
    assert len(err.decode().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # a header version the writer does not know
    v2 = bytearray(good.read_bytes())
    v2[12] = 2
    bad.write_bytes(bytes(v2))
    rc, out, err = dump_tool([bad, tmp_path / "out"], capsysbinary)
    assert rc == 1 and err.startswith(b"composefs-dump: cannot write file: Invalid argument")


# --- the dump round trip through the command line ------------------------------------------------

_ROUNDTRIP_CASES = [c for c in load_conformance_cases() if not c.must_fail]


@pytest.mark.skipif(not _ROUNDTRIP_CASES, reason=f"conformance corpus not found at {CONFORMANCE}")
@pytest.mark.parametrize("case", _ROUNDTRIP_CASES, ids=[c.name for c in _ROUNDTRIP_CASES])
def test_writer_order_dump_rebuilds_the_same_image(case, tmp_path, monkeypatch, capsysbinary):
    """image -> composefs-info --writer-order dump -> mkcomposefs --from-file: the same bytes."""
    from mkcfs.cli.composefs_info import main as info_main
    from mkcfs.cli.mkcomposefs import main as mk_main

    monkeypatch.delenv("CFS_PARSE_STRICT", raising=False)
    src = tmp_path / "in.dump"
    src.write_bytes(case.read_input())
    image = tmp_path / "a.img"
    assert mk_main([*case.args, "--from-file", str(src), str(image)]) == 0
    capsysbinary.readouterr()
    assert info_main(["--writer-order", "dump", str(image)]) == 0
    dump = tmp_path / "a.dump"
    dump.write_bytes(capsysbinary.readouterr().out)
    again = tmp_path / "b.img"
    assert mk_main([*case.args, "--from-file", str(dump), str(again)]) == 0
    assert_same_image(again.read_bytes(), image.read_bytes())


# --- dump: the text waits until the image was read to the end ---------------------------------

def _generated_image(tmp_path, seed: int = 3):
    from mkcfs.build.image import build_image

    from .treegen import generate

    path = tmp_path / "g.img"
    path.write_bytes(bytes(build_image(generate(seed, bulk=200, large=10000).root).data))
    return path


def _tree_dump(path) -> bytes:
    from mkcfs.inspect.unflatten import load_tree
    from mkcfs.sources.dumpfile import format_dumpfile

    return format_dumpfile(load_tree(path.read_bytes()))


@pytest.mark.parametrize("spool_memory", [0, 1000, 1 << 30])
def test_dump_text_spooled_through_a_file_is_intact(tmp_path, capsysbinary, monkeypatch,
                                                     spool_memory):
    path = _generated_image(tmp_path)
    monkeypatch.setattr(composefs_info, "_SPOOL_MEMORY", spool_memory)
    monkeypatch.setattr(composefs_info, "_SPOOL_CHUNK", 777)
    assert composefs_info.main(["dump", str(path)]) == 0
    assert capsysbinary.readouterr().out == _tree_dump(path)


def test_dump_text_stays_in_memory_without_a_temporary_file(tmp_path, capsysbinary,
                                                             monkeypatch):
    import tempfile

    def no_file(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    path = _generated_image(tmp_path)
    monkeypatch.setattr(composefs_info, "_SPOOL_MEMORY", 1000)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_file)
    assert composefs_info.main(["dump", str(path)]) == 0
    assert capsysbinary.readouterr().out == _tree_dump(path)


def test_dump_of_an_image_damaged_late_prints_nothing(tmp_path, capsysbinary, monkeypatch):
    from erofs.reader import Image

    path = _generated_image(tmp_path)
    data = bytearray(path.read_bytes())
    image = Image(bytes(data))
    # a directory far into the walk (the largest nid: the writer numbers breadth first) gets
    # a bad first name offset
    dirs = [image.root_nid]
    for dir_nid in dirs:
        for name, nid, _type in image.dirents(image.inode(dir_nid)):
            if name not in (b".", b"..") and image.inode(nid).mode & 0o170000 == 0o040000:
                dirs.append(nid)
    last_dir = max(dirs)
    offset = image.extents(image.inode(last_dir))[0][0]
    data[offset + 8] = 7
    path.write_bytes(bytes(data))
    monkeypatch.setattr(composefs_info, "_SPOOL_MEMORY", 1000)
    assert composefs_info.main(["dump", str(path)]) == 1
    out, err = capsysbinary.readouterr()
    assert out == b""
    assert err.startswith(b"composefs-info: Failed to load") and err.count(b"\n") == 1

