#!/usr/bin/env python3
"""Generate the hand-made dumpfiles in testdata/golden/ (each aims at one corner of the format).

The pinned hashes in testdata/golden/expected.tsv were produced by mkcomposefs 1.0.8 and are
checked by tests/test_golden.py; rerun this script only to add cases, then pin the new hashes.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "testdata" / "golden"
DIGEST_X5000 = "838b2c37e0ad28bb545e3edbe665a04a8ef1b3d559fe568db29b546e4458e1d4"


def esc(data: bytes) -> str:
    out = []
    for b in data:
        c = chr(b)
        if c == "\\":
            out.append("\\\\")
        elif 0x21 <= b <= 0x7E and c != "=":
            out.append(c)
        else:
            out.append("\\x%02x" % b)
    return "".join(out)


def cases() -> dict[str, list[str]]:
    c: dict[str, list[str]] = {}
    c["ex1-root-only"] = ["/ 0 40755 2 0 0 0 0.0 - - -"]
    c["ex2-mixed"] = [
        "/ 4096 40755 3 0 0 0 1700000000.0 - - - security.selinux=system_u:object_r:root_t:s0\\x00",
        f"/big 5000 100644 2 0 0 0 1700000000.0 83/{DIGEST_X5000[2:]} - {DIGEST_X5000} user.tag=shared",
        "/dir 0 40755 2 1000 1000 0 1700000123.456 - - -",
        "/dir/hello.txt 6 100644 1 1000 1000 0 1700000000.0 - hello\\n - user.tag=shared",
        f"/hl 5000 @100644 2 0 0 0 1700000000.0 /big - {DIGEST_X5000}",
        "/link 13 120777 1 0 0 0 1700000000.0 dir/hello.txt - -",
    ]
    c["ex3-whiteouts"] = [
        "/ 0 40755 3 0 0 0 0.0 - - -",
        "/d 0 40755 2 0 0 0 0.0 - - - trusted.overlay.opaque=y",
        "/d/gone 0 20000 1 0 0 0 0.0 - - -",
        "/fifo 0 10644 1 0 0 0 0.0 - - -",
        "/null 0 20666 1 0 0 259 0.0 - - -",
    ]
    ex4 = ["/ 0 40755 3 0 0 0 0.0 - - -", "/d 0 40755 2 0 0 0 0.0 - - -"]
    ex4 += ["/d/entry-with-a-long-name-%03d 0 100644 1 0 0 0 0.0 - - -" % i for i in range(250)]
    ex4 += ["/l4000 4000 120777 1 0 0 0 0.0 %s - -" % ("a" * 4000),
            "/l4095 4095 120777 1 0 0 0 0.0 %s - -" % ("b" * 4095)]
    c["ex4-big-dir-long-links"] = ex4
    # inline sizes around the block/tail thresholds, and external files of many sizes
    lines = ["/ 0 40755 2 0 0 0 100.5 - - -"]
    for n in (1, 63, 64, 65, 2047, 2048, 2049, 4095, 4096, 4097, 5000):
        lines.append(f"/inline-{n} {n} 100600 1 0 0 0 100.5 - {esc(bytes((i * 7 + n) & 0xff for i in range(n)))} -")
    for n in (1, 4096, 4097, 1 << 20, (1 << 32) + 1, 1 << 43, (1 << 43) + 1, 1 << 50):
        lines.append(f"/ext-{n} {n} 100644 1 0 0 0 100.5 ab/{'%062x' % n} - {'%064x' % (n * 31)}")
    lines.append("/ext-nodigest 5000 100644 1 0 0 0 100.5 ab/cd - -")
    lines.append("/ext-nopayload 5000 100644 1 0 0 0 100.5 - - -")
    lines.append("/ext-slashpayload 5000 100644 1 0 0 0 100.5 /x/y - -")
    lines.append("/empty 0 100644 1 0 0 0 100.5 - - -")
    c["file-sizes"] = lines
    # big ids, nanosecond and negative times, nlink beyond 16 bits, devices, fifo size quirk
    c["attrs"] = [
        "/ 0 40700 2 70000 80000 0 -5.999999999 - - -",
        "/bigids 0 100644 70000 4294967295 65536 0 -5.999999999 - - -",
        "/ns 0 100644 1 1 2 0 1.1 - - -",
        "/neg 0 100644 1 0 0 0 -100.0 - - -",
        "/chr 0 20620 1 0 6 1025 -5.999999999 - - -",
        "/blk 0 60660 1 0 6 2049 -5.999999999 - - -",
        "/bigrdev 0 20600 1 0 0 4294967295 -5.999999999 - - -",
        "/fifo-huge 5000000000 10644 1 0 0 0 -5.999999999 - - -",
        "/sock 0 140755 1 0 0 0 -5.999999999 - - -",
        "/suid 0 104755 1 0 0 0 -5.999999999 - - -",
    ]
    # xattrs: escaping, shared table order, ACL flag, many per inode (shared cap of 128)
    many = " ".join(f"user.k{i:03d}=v" for i in range(140))
    c["xattrs"] = [
        "/ 0 40755 2 0 0 0 0.0 - - - security.selinux=ctx trusted.overlay.opaque=z",
        "/a 0 100644 1 0 0 0 0.0 - - - " + many,
        "/b 0 100644 1 0 0 0 0.0 - - - " + many,
        "/acl 0 40755 2 0 0 0 0.0 - - - system.posix_acl_default=\\x02\\x00\\x00\\x00 system.posix_acl_access=\\x02\\x00",
        "/acl/f 0 100644 1 0 0 0 0.0 - - - system.posix_acl_access=\\x02\\x00 user.overlay.foo=bar trusted.overlay.overlay.x=1",
        "/esc 0 100644 1 0 0 0 0.0 - - - trusted.overlay.redirect=/evil trusted.overlay.metacopy= trusted.other=v lustre.x=1 system.nfs4_acl=abc",
        "/eq 0 100644 1 0 0 0 0.0 - - - user.a\\x3db=c=d user.bin=\\x00\\xff\\n",
        "/big 0 100644 1 0 0 0 0.0 - - - user.big=" + "v" * 3000,
        "/big2 0 100644 1 0 0 0 0.0 - - - user.big=" + "v" * 3000,
    ]
    # names: odd bytes, 255-byte names, names sorting before '.', root whiteout name collisions
    c["names"] = [
        "/ 0 40755 2 0 0 0 0.0 - - -",
        "/!bang 0 100644 1 0 0 0 0.0 - - -",
        "/-dash 0 100644 1 0 0 0 0.0 - - -",
        "/\\x20space 0 100644 1 0 0 0 0.0 - - -",
        "/\\x01ctl 0 100644 1 0 0 0 0.0 - - -",
        "/\\xff\\xfehigh 0 100644 1 0 0 0 0.0 - - -",
        "/" + "n" * 255 + " 0 100644 1 0 0 0 0.0 - - -",
        "/00 0 40755 2 0 0 0 0.0 - - -",
        "/ab 0 100644 1 0 0 0 0.0 - - -",
        "/ff 2 120777 1 0 0 0 0.0 00 - -",
        "/tab\\tnl\\nbs\\\\ 0 100644 1 0 0 0 0.0 - - -",
    ]
    # hard links: chains, to a directory, to a whiteout, resolution order
    c["hardlinks"] = [
        "/ 0 40755 2 0 0 0 0.0 - - -",
        "/d 0 40755 2 0 0 0 0.0 - - -",
        "/d/f 5 100644 3 0 0 0 0.0 - hello -",
        "/h1 0 @100644 0 0 0 0 0.0 /d/f - -",
        "/h2 0 @100644 0 0 0 0 0.0 /h1 - -",
        "/hd 0 @100644 0 0 0 0 0.0 /d - -",
        "/wo 0 20000 1 0 0 0 0.0 - - -",
        "/hwo 0 @20000 0 0 0 0 0.0 /wo - -",
        "/z 0 @100644 0 0 0 0 0.0 /zz - -",
        "/zz 0 100644 1 0 0 0 0.0 - - -",
    ]
    # deep tree and a directory whose tail must be padded into the next block
    deep = ["/ 0 40755 2 0 0 0 0.0 - - -"]
    path = ""
    for i in range(60):
        path += "/level%02d" % i
        deep.append(f"{path} 0 40755 2 0 0 0 0.0 - - - user.depth={i}")
    c["deep"] = deep
    pad = ["/ 0 40755 2 0 0 0 0.0 - - -"]
    for d in range(12):
        pad.append(f"/d{d:02d} 0 40755 2 0 0 0 {d}.0 - - - user.x=" + "y" * (d * 97))
        for i in range(d * 9):
            pad.append(f"/d{d:02d}/file-{i:04d}-{'q' * (d * 3)} 0 100644 1 0 0 0 0.0 - - -")
    c["tail-padding"] = pad
    # external files as the layout's one-call paths see them: unique contents (two inline
    # overlay xattrs), shared contents (a body of shared refs, known by its list), both with
    # compact (oldest mtime) and extended inodes, with an own xattr besides, and sizes around
    # the chunk size changes and past 4 GiB
    ext = ["/ 0 40755 2 0 0 0 100.0 - - -"]
    for i, size in enumerate((65, 4096, 4097, 1 << 20, (1 << 20) + 1, (1 << 32) - 1, 1 << 32,
                              (1 << 32) + 5, 1 << 40)):
        digest = "%064x" % (0xA5 << 8 | i)
        for copy in range(3 if i % 3 == 0 else 1):
            mtime = "100.0" if (i + copy) % 2 else f"{200 + i}.5"
            ext.append(f"/f{i:02d}-{copy} {size} 100644 1 {i * 7} 0 0 {mtime} "
                       f"{digest[:2]}/{digest[2:]} - {digest}")
        own = "%064x" % (0xB5 << 8 | i)
        ext.append(f"/x{i:02d} {size} 100600 1 0 0 0 100.0 {own[:2]}/{own[2:]} - {own}"
                   f" user.tag=t{i % 2}")
    c["external-files"] = ext
    # the shared xattr table's order: key, then value length, then value, all descending, with
    # values of one key in several lengths
    shared = ["/ 0 40755 2 0 0 0 0.0 - - -"]
    for name, tag, k in (("a", "zz", "1"), ("b", "zz", "1"), ("c", "a", "22"), ("d", "a", "22"),
                         ("e", "bbbb", "1"), ("f", "bbbb", "3"), ("g", "b", "3"),
                         ("h", "b", "333")):
        shared.append(f"/{name} 0 100644 1 0 0 0 0.0 - - - user.tag={tag} user.k={k}"
                      + (" trusted.x=q" if name in "ef" else ""))
    c["shared-xattr-order"] = shared
    return c


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lines in cases().items():
        (OUT / f"{name}.dump").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
