"""``mkcfs fsck`` and ``mkcfs gc``: each kind of damage reported once, repairs, exactly the
referenced objects kept, and builds racing with gcs never losing an object of a finished image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fsverity
from mkcfs.cli import composefs_info, mkcomposefs
from mkcfs.cli import mkcfs as group
from mkcfs.store import lock as store_lock
from mkcfs.store.gc import collect
from mkcfs.store.layout import resolve_store

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_tree(root: Path, seed: int, count: int = 6) -> None:
    for i in range(count):
        write(root / f"d{i % 2}" / f"f{i}", (b"%d-%d " % (seed, i)) * (20 + 50 * i))
    write(root / "small", b"inline")


def build(src: Path, store: Path, image: Path) -> None:
    assert mkcomposefs.main([f"--digest-store={store}", "--threads=1", str(src), str(image)]) == 0


def objects_of(image: Path, capsys) -> set[str]:
    """What ``composefs-info objects`` prints for the image: the oracle of the gc tests."""
    capsys.readouterr()
    assert composefs_info.main(["objects", str(image)]) == 0
    return set(capsys.readouterr().out.split())


def store_objects(store: Path) -> set[str]:
    return {f"{d.name}/{o.name}" for d in store.iterdir() if len(d.name) == 2 for o in d.iterdir()}


def mkcfs(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = group.main([*args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def built(tmp_path):
    src, store, image = tmp_path / "src", tmp_path / "store", tmp_path / "image"
    make_tree(src, 1)
    build(src, store, image)
    return src, store, image


def test_fsck_clean_store(built, capsys):
    _src, store, image = built
    assert (store / ".mkcfs-digest-cache").is_file()   # the builds' digest cache: a known file
    status, out, err = mkcfs("fsck", str(store), str(image), capsys=capsys)
    assert (status, out) == (0, "")
    assert "6 objects" in err and "0 problems" in err


def test_fsck_reports_each_fault_once_and_repair_restores(built, capsys):
    src, store, image = built
    objects = sorted(store_objects(store))
    assert len(objects) == 6
    flipped, truncated, misnamed, missing = objects[:4]
    data = bytearray((store / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    (store / flipped).write_bytes(bytes(data))
    os.truncate(store / truncated, 7)
    wrong_name = misnamed[:3] + "0" * 62
    os.rename(store / misnamed, store / wrong_name)
    os.unlink(store / missing)
    write(store / "stray-file", b"not an object")

    status, out, err = mkcfs("fsck", str(store), str(image), capsys=capsys)
    assert status == 1
    assert sorted(out.splitlines()) == sorted([
        "stray stray-file: not an object directory (a regular file)",
        f"corrupt {flipped}: content has digest "
        + fsverity.digest_bytes(bytes(data)).hex(),
        f"corrupt {truncated}: content has digest "
        + fsverity.digest_bytes((store / truncated).read_bytes()).hex(),
        f"misnamed {wrong_name}: holds {misnamed} (needed by {image})",
        f"missing {missing}: needed by {image}",
    ])

    status, out, _ = mkcfs("fsck", "--json", "--repair", str(store), str(image), capsys=capsys)
    report = json.loads(out)
    assert status == 1 and len(report["problems"]) == 5
    assert sorted(m["path"] for m in report["moved"]) == sorted(
        [flipped, truncated, wrong_name, "stray-file"])
    for moved in report["moved"]:   # moved aside, never deleted
        assert (store / moved["to"]).is_file()
        assert moved["to"].startswith(".quarantine/")

    build(src, store, tmp_path_image := image.with_name("rebuilt"))
    assert tmp_path_image.read_bytes() == image.read_bytes()
    status, out, _ = mkcfs("fsck", str(store), str(image), capsys=capsys)
    assert (status, out) == (0, "")


def test_fsck_stray_entries_in_object_dirs(built, capsys):
    _src, store, _image = built
    sub = next(d for d in store.iterdir() if len(d.name) == 2)
    write(sub / "ABCDEF", b"x")
    os.symlink("elsewhere", sub / ("1" * 62))
    (store / "zz").mkdir()
    write(store / ".tmp-1-dead", b"a build's temporary file: known, not reported")
    status, out, _ = mkcfs("fsck", str(store), capsys=capsys)
    assert status == 1
    assert sorted(line.split(":")[0] for line in out.splitlines()) == sorted([
        f"stray {sub.name}/ABCDEF", f"stray {sub.name}/{'1' * 62}", "stray zz"])


def test_fsck_managed_store_checks_its_images(tmp_path, capsys):
    store = tmp_path / "managed"
    (store / "images").mkdir(parents=True)
    make_tree(tmp_path / "src", 2)
    build(tmp_path / "src", store / "objects", store / "images" / "one")
    assert mkcfs("fsck", str(store), capsys=capsys)[0] == 0
    victim = sorted(store_objects(store / "objects"))[0]
    os.unlink(store / "objects" / victim)
    status, out, _ = mkcfs("fsck", str(store), capsys=capsys)
    assert (status, out) == (1, f"missing {victim}: needed by {store / 'images' / 'one'}\n")


def test_fsck_errors_are_one_line_and_status_2(tmp_path, capsys):
    status, out, err = mkcfs("fsck", str(tmp_path / "nope"), capsys=capsys)
    assert (status, out) == (2, "")
    assert err == f"mkcfs fsck: {tmp_path / 'nope'}: no such store\n"
    (tmp_path / "store").mkdir()
    (tmp_path / "bad.img").write_bytes(b"not an image")
    status, out, _ = mkcfs("fsck", str(tmp_path / "store"), str(tmp_path / "bad.img"),
                           capsys=capsys)
    assert status == 1 and out.startswith(f"bad-image {tmp_path / 'bad.img'}: cannot be read")


def test_gc_keeps_exactly_the_referenced_objects(tmp_path, capsys):
    store, keep = tmp_path / "store", tmp_path / "keep"
    keep.mkdir()
    images = []
    for seed in range(4):
        make_tree(tmp_path / f"src{seed}", seed % 3)   # seeds 0 and 3 share their objects
        write(tmp_path / f"src{seed}" / "own", b"own %d " % seed * 40)
        images.append(keep / f"image{seed}")
        build(tmp_path / f"src{seed}", store, images[-1])
    all_objects = store_objects(store)
    os.unlink(images[1])
    kept = objects_of(images[0], capsys) | objects_of(images[2], capsys) \
        | objects_of(images[3], capsys)
    assert kept < all_objects

    status, out, _ = mkcfs("gc", "--dry-run", "--json", str(store), "--keep-dir", str(keep),
                           capsys=capsys)
    report = json.loads(out)
    assert status == 0 and report["removed_objects"] == len(all_objects - kept)
    assert store_objects(store) == all_objects

    status, out, _ = mkcfs("gc", str(store), "--keep-dir", str(keep), "--list", capsys=capsys)
    removed = out.splitlines()[:-1]
    assert status == 0 and set(removed) == all_objects - kept
    assert out.splitlines()[-1].startswith(f"removed {len(all_objects - kept)} objects (")
    assert store_objects(store) == kept

    status, out, _ = mkcfs("gc", str(store), "--keep", str(images[2]), capsys=capsys)
    assert status == 0 and store_objects(store) == objects_of(images[2], capsys)
    assert mkcfs("fsck", str(store), str(images[2]), capsys=capsys)[0] == 0


def test_gc_keeps_the_objects_of_an_image_mounted_from_outside_the_store(tmp_path, capsys):
    """``mkcfs mount --store S IMAGE MNT`` of an image file outside ``S/images`` records it in
    ``S/mounts/``: gc of the managed store keeps its objects while that run state exists."""
    from dataclasses import asdict

    from mkcfs.fsutil import write_atomically
    from mkcfs.store.images import ManagedStore, MountState

    store = tmp_path / "managed"
    (store / "images").mkdir(parents=True)
    make_tree(tmp_path / "kept", 1)
    build(tmp_path / "kept", store / "objects", store / "images" / "one")
    make_tree(tmp_path / "mounted", 2)
    outside = tmp_path / "outside.cfs"
    build(tmp_path / "mounted", store / "objects", outside)
    wanted = objects_of(store / "images" / "one", capsys) | objects_of(outside, capsys)
    assert objects_of(outside, capsys) - objects_of(store / "images" / "one", capsys)

    managed = ManagedStore(str(store))
    os.makedirs(managed.mounts)
    state = MountState(str(tmp_path / "mnt"), str(outside), managed.objects, None, 1, 1)
    write_atomically(os.path.join(managed.mounts, "k.json"), json.dumps(asdict(state)).encode())
    assert mkcfs("gc", str(store), capsys=capsys)[0] == 0
    assert store_objects(store / "objects") == wanted

    os.unlink(os.path.join(managed.mounts, "k.json"))     # unmounted: its objects may go
    assert mkcfs("gc", str(store), capsys=capsys)[0] == 0
    assert store_objects(store / "objects") == objects_of(store / "images" / "one", capsys)


def test_gc_refuses_without_keep_and_on_unreadable_image(built, tmp_path, capsys):
    _src, store, image = built
    before = store_objects(store)
    status, _, err = mkcfs("gc", str(store), capsys=capsys)
    assert status == 1 and "say which images to keep" in err
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "broken").write_bytes(b"garbage")
    status, _, err = mkcfs("gc", str(store), "--keep-dir", str(tmp_path / "keep"), capsys=capsys)
    assert status == 1 and err.startswith(f"mkcfs gc: kept image {tmp_path / 'keep' / 'broken'}")
    assert store_objects(store) == before


def test_gc_removes_stale_temporaries_only(built, tmp_path):
    _src, store, image = built
    dead = store / ".tmp-99999-dead"
    dead.write_bytes(b"left by a killed build")
    alive = store / ".tmp-1-alive"
    alive.write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1]);"
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(alive)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        report = collect(resolve_store(str(store)), [str(image)], [])
    finally:
        holder.kill()
        holder.wait()
    assert report.temporaries_removed == 1 and not dead.exists() and alive.exists()


def test_gc_waits_for_a_build_holding_the_lock(built):
    """A shared lock (a build) keeps the exclusive one (gc) away, and only while held."""
    _src, store, image = built
    build_lock = store_lock.shared(str(store))
    assert store_lock.exclusive(str(store), wait=False) is None
    build_lock.release()
    held = store_lock.exclusive(str(store), wait=False)
    assert held is not None
    held.release()


BUILDER = r"""
import os, sys
from pathlib import Path
from mkcfs.cli import mkcomposefs
from mkcfs.inspect.objects import image_file_objects

name, base, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store, keep = base / "store", base / "keep"
for i in range(rounds):
    src = base / f"src-{name}-{i}"
    src.mkdir()
    for k in range(4):   # objects shared with other rounds and builders: often garbage
        (src / f"shared{k}").write_bytes(b"shared %d " % ((i + k) % 7) * 30)
    (src / "own").write_bytes(b"%s %d " % (name.encode(), i) * 30)
    image = keep / f"{name}-{i}"
    assert mkcomposefs.main([f"--digest-store={store}", "--threads=1", str(src), str(image)]) == 0
    missing = [o for o in image_file_objects(image) if not (store / os.fsdecode(o)).exists()]
    if missing:
        sys.exit(f"{image}: lost {len(missing)} objects right after the build")
    if i >= 1:   # drop the previous image: its objects become garbage, and are reused soon
        os.unlink(keep / f"{name}-{i - 1}")
    print(i, flush=True)
"""


def test_builds_racing_with_gc_never_lose_an_object(tmp_path):
    """Two builder processes (50 builds each) and a gc loop in this process, for at most
    two minutes: every image found in place at the end has all its objects."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "store").mkdir()
    rounds = 50
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, name, str(tmp_path), str(rounds)],
                                 env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for name in ("a", "b")]
    layout = resolve_store(str(tmp_path / "store"))
    gcs = removed = 0
    deadline = time.monotonic() + 120
    try:
        while any(b.poll() is None for b in builders) and time.monotonic() < deadline:
            report = collect(layout, [], [str(tmp_path / "keep")])
            gcs += 1
            removed += len(report.removed)
        for builder in builders:
            assert builder.wait(timeout=max(1, deadline - time.monotonic())) == 0, \
                builder.stderr.read().decode()
    finally:
        for builder in builders:
            builder.kill()
            builder.wait()
    report = collect(layout, [], [str(tmp_path / "keep")])
    assert gcs >= rounds and removed > 0, (gcs, removed)
    images = sorted((tmp_path / "keep").iterdir())
    assert [p.name for p in images] == [f"a-{rounds - 1}", f"b-{rounds - 1}"]
    status = group.main(["fsck", str(tmp_path / "store"), *map(str, images)])
    assert status == 0


def test_lock_of_a_store_created_during_the_build_is_kept_to_the_end(tmp_path):
    """A build into a store that does not exist yet: the lock its ObjectStore takes when it
    creates the directory outlives the ObjectStore, up to the end of ``retain_shared``."""
    from mkcfs.store.objects import ObjectStore

    store = tmp_path / "new-store"
    with store_lock.retain_shared(str(store)):
        objects = ObjectStore(str(store))
        assert not store.exists()
        objects.prepare_root()
        objects.close()
        del objects
        assert store_lock.exclusive(str(store), wait=False) is None
    held = store_lock.exclusive(str(store), wait=False)
    assert held is not None
    held.release()


@pytest.mark.parametrize("inside", [False, True])
def test_a_build_that_creates_the_store_keeps_its_lock(tmp_path, inside):
    """The store does not exist when the build starts (beside the source, or inside it and
    filled after the walk): it is created by this process, whose lock outlives the walk."""
    from mkcfs.sources.walk import WalkOptions, walk_directory

    src = tmp_path / "src"
    make_tree(src, 5)
    store = (src if inside else tmp_path) / "new-store"
    with store_lock.retain_shared(str(store)):
        walk_directory(src, WalkOptions(digest_store=store, threads=2, progress=False))
        assert len(store_objects(store)) == 6
        assert store_lock.exclusive(str(store), wait=False) is None
    held = store_lock.exclusive(str(store), wait=False)
    assert held is not None
    held.release()
