"""Varied test trees: generate them, put them on disk, read trees back, and compare.

* ``generate(seed, bulk=N)`` builds a :class:`~mkcfs.tree.Node` tree holding every file type and
  the awkward cases (inline/external/empty/large files, long symlink targets, devices with large
  numbers, overlay whiteouts, xattrs incl. ``trusted.overlay.*`` and binary values, an ACL, 255-byte
  names, odd owners/modes/mtimes, hard links, several thousand entries) plus the external files'
  data, keyed by fs-verity digest (``GenTree.objects``).
* ``write_objects(objects, basedir)`` fills an object store (``ab/cdef...`` names).
* ``materialize(tree, path)`` creates the same tree on disk (root only: devices, trusted xattrs).
* ``snapshot_dir(path)`` reads a tree from disk (or a mount) into ``{path: Rec}``;
  ``snapshot_tree(tree)`` gives the same records for a generated tree;
  ``as_mounted(records, version)`` turns source records into what a composefs mount shows;
  ``diff(expected, actual)`` lists the differences (empty when equal).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from dataclasses import dataclass, field, replace

from fsverity import digest_bytes, object_path
from mkcfs.tree import HardLink, Node

S_IFMT = 0o170000
KIND = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
        stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}
#: files up to this size are stored inline in generated trees (mkcomposefs's rule for directories)
INLINE_MAX = 64


@dataclass
class GenTree:
    root: Node
    objects: dict[bytes, bytes] = field(default_factory=dict)   # digest -> data
    data: dict[int, bytes] = field(default_factory=dict)        # id(node) -> data (external)


@dataclass(frozen=True)
class Rec:
    """What the tests compare of one path."""

    kind: str
    perm: int
    uid: int
    gid: int
    mtime_ns: int
    size: int | None           # None for directories (their size is the filesystem's business)
    sha: str | None            # sha256 of a regular file's data
    target: bytes | None       # symlink target
    rdev: int                  # devices only, else 0
    xattrs: tuple[tuple[bytes, bytes], ...]
    nlink: int
    link_group: bytes          # the smallest path naming the same inode

    def show(self) -> str:
        return (f"{self.kind} {self.perm:o} {self.uid}:{self.gid} mtime={self.mtime_ns} "
                f"size={self.size} sha={self.sha and self.sha[:12]} target={self.target!r} "
                f"rdev={self.rdev:#x} nlink={self.nlink} group={self.link_group!r} "
                f"xattrs={dict(self.xattrs)!r}")


# ------------------------------------------------------------------------------------------------
# generating
# ------------------------------------------------------------------------------------------------

def _acl(uid: int) -> bytes:
    """A valid POSIX ACL xattr value (version 2): u::rw-,u:UID:r--,g::r--,m::r--,o::r--."""
    import struct
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 4, uid), (0x04, 4, undefined), (0x10, 4, undefined),
               (0x20, 4, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


class _Gen:
    def __init__(self, seed: int, mtime: int) -> None:
        self.rng = random.Random(seed)
        self.mtime = mtime
        self.tree = GenTree(Node(stat.S_IFDIR | 0o755, mtime_sec=mtime, mtime_nsec=123))

    def node(self, kind: int, perm: int = 0o644, **kw: object) -> Node:
        kw.setdefault("mtime_sec", self.mtime + self.rng.randrange(10**6))
        kw.setdefault("mtime_nsec", self.rng.randrange(10**9))
        return Node(kind | perm, **kw)  # type: ignore[arg-type]

    def dir(self, parent: Node, name: bytes, perm: int = 0o755, **kw: object) -> Node:
        d = self.node(stat.S_IFDIR, perm, **kw)
        parent.children[name] = d  # type: ignore[index]
        return d

    def file(self, parent: Node, name: bytes, data: bytes, perm: int = 0o644,
             inline: bool | None = None, **kw: object) -> Node:
        if inline is None:
            inline = len(data) <= INLINE_MAX
        if not data:
            n = self.node(stat.S_IFREG, perm, **kw)
        elif inline:
            n = self.node(stat.S_IFREG, perm, size=len(data), content=data, **kw)
        else:
            digest = digest_bytes(data)
            n = self.node(stat.S_IFREG, perm, size=len(data), digest=digest,
                          payload=object_path(digest).encode(), **kw)
            self.tree.objects[digest] = data
            self.tree.data[id(n)] = data
        parent.children[name] = n  # type: ignore[index]
        return n

    def special(self, parent: Node, name: bytes, kind: int, rdev: int = 0, perm: int = 0o644,
                **kw: object) -> Node:
        n = self.node(kind, perm, rdev=rdev, **kw)
        parent.children[name] = n  # type: ignore[index]
        return n

    def symlink(self, parent: Node, name: bytes, target: bytes, **kw: object) -> Node:
        n = self.node(stat.S_IFLNK, 0o777, size=len(target), payload=target, **kw)
        parent.children[name] = n  # type: ignore[index]
        return n


def generate(seed: int = 0, *, bulk: int = 3000, large: int = 5 << 20, whiteouts: bool = True,
             acl: bool = True, mtime: int = 1_700_000_000) -> GenTree:
    """A tree with every file type and the awkward cases; ``bulk`` extra small files."""
    g = _Gen(seed, mtime)
    rng = g.rng
    root = g.tree.root
    root.xattrs[b"user.root"] = b"top"

    # -- regular files: empty, inline, external, large
    files = g.dir(root, b"files")
    g.file(files, b"empty", b"")
    g.file(files, b"empty-0600", b"", perm=0o600, uid=1000, gid=1000)
    for size in (1, 2, 63, 64):
        g.file(files, b"inline-%d" % size, rng.randbytes(size))
    for size in (100, 2048, 2049, 4095, 4096, 5000):
        g.file(files, b"inline-big-%d" % size, rng.randbytes(size), inline=True)
    for size in (65, 4095, 4096, 4097, 65536, (1 << 20) + 1):
        g.file(files, b"external-%d" % size, rng.randbytes(size))
    g.file(files, b"large", rng.randbytes(large))
    g.file(files, b"zeros", bytes(3 << 20) + b"x")
    same = rng.randbytes(1000)
    g.file(files, b"same-1", same)           # two files, one object
    g.file(files, b"same-2", same, perm=0o600)

    # -- symlinks
    links = g.dir(root, b"symlinks")
    g.symlink(links, b"rel", b"../files/inline-1")
    g.symlink(links, b"abs", b"/etc/hostname")
    g.symlink(links, b"dangling", b"does/not/exist")
    g.symlink(links, b"dot", b".")
    g.symlink(links, b"odd", b"we\x01ird \xff\\n=target")
    g.symlink(links, b"long-1024", b"a/" * 511 + b"zz")
    g.symlink(links, b"long-4095", (b"x" * 254 + b"/") * 16 + b"y" * 15)

    # -- devices, fifos, sockets, whiteouts
    dev = g.dir(root, b"devices")
    g.special(dev, b"null", stat.S_IFCHR, os.makedev(1, 3), perm=0o666)
    g.special(dev, b"sda", stat.S_IFBLK, os.makedev(8, 0), perm=0o660, gid=6)
    g.special(dev, b"chr-big", stat.S_IFCHR, os.makedev(4095, 0xFFFFF))
    g.special(dev, b"blk-big", stat.S_IFBLK, os.makedev(259, 65536 + 7))
    g.special(dev, b"fifo", stat.S_IFIFO, perm=0o620)
    g.special(dev, b"socket", stat.S_IFSOCK, perm=0o755)
    if whiteouts:
        wh = g.dir(root, b"whiteouts")
        g.special(wh, b"gone", stat.S_IFCHR, 0, perm=0o000)
        g.special(wh, b"gone-too", stat.S_IFCHR, 0, perm=0o644, uid=7)
        g.file(wh, b"kept", b"still here")
        deeper = g.dir(wh, b"deeper")
        g.special(deeper, b"wh", stat.S_IFCHR, 0)

    # -- modes, owners, times
    modes = g.dir(root, b"modes")
    for perm in (0o000, 0o400, 0o644, 0o755, 0o777, 0o1777, 0o2755, 0o4755, 0o6711, 0o7777):
        g.file(modes, b"f-%04o" % perm, b"m", perm=perm)
    g.dir(modes, b"d-1777", perm=0o1777)
    g.dir(modes, b"d-0700", perm=0o700)
    g.dir(modes, b"d-2775", perm=0o2775)
    owners = g.dir(root, b"owners")
    for uid, gid in ((0, 0), (1, 2), (1000, 100), (65534, 65534), (65535, 65535), (65536, 3),
                     (100000, 100000), (4294967294, 4294967294), (123456789, 7)):
        g.file(owners, b"u%d-g%d" % (uid, gid), b"o" * 70, uid=uid, gid=gid)
    g.dir(owners, b"dir-100000", uid=100000, gid=100001)
    g.symlink(owners, b"link-1234", b"target", uid=1234, gid=4321)
    times = g.dir(root, b"times")
    for sec, nsec in ((0, 0), (1, 1), (2**31 - 1, 999999999), (2**31, 0), (2**32 + 5, 5),
                      (2**33 + 12345, 500), (mtime, 0)):
        g.file(times, b"t-%d.%d" % (sec, nsec), b"t", mtime_sec=sec, mtime_nsec=nsec)
    g.dir(times, b"dir-old", mtime_sec=1, mtime_nsec=2)

    # -- xattrs
    xa = g.dir(root, b"xattrs")
    xa.xattrs[b"user.on-dir"] = b"d"
    xa.xattrs[b"trusted.overlay.opaque"] = b"y"          # escaped: must not hide anything
    f = g.file(xa, b"user", b"x" * 200)
    f.xattrs.update({b"user.empty": b"", b"user.bin": bytes(range(256)),
                     b"user.big": rng.randbytes(3000), b"user.eq=sign": b"a=b c\n"})
    f = g.file(xa, b"many", b"inline")
    for i in range(60):
        f.xattrs[b"user.many.%03d" % i] = b"v%d" % i
    f = g.file(xa, b"overlay", b"overlay xattrs, escaped by mkcomposefs" * 3)
    f.xattrs.update({b"trusted.overlay.foo": b"bar", b"trusted.overlay.redirect": b"/nowhere",
                     b"trusted.overlay.metacopy": b"", b"trusted.overlay.overlay.x": b"nested",
                     b"user.overlay.origin": b"u"})
    f = g.file(xa, b"trusted-security", b"ts")
    f.xattrs.update({b"trusted.plain": b"t", b"security.test": b"s"})
    lnk = g.symlink(xa, b"symlink", b"user")
    lnk.xattrs[b"trusted.on-symlink"] = b"l"
    shared = rng.randbytes(40)
    for i in range(20):                              # the same xattr on many inodes (shared)
        f = g.file(xa, b"shared-%02d" % i, b"s%d" % i)
        f.xattrs[b"user.shared"] = shared
        f.xattrs[b"user.own"] = b"%d" % i
    if acl:
        f = g.file(xa, b"acl", b"acl", perm=0o644)
        f.xattrs[b"system.posix_acl_access"] = _acl(1000)
        d = g.dir(xa, b"acl-dir")
        d.xattrs[b"system.posix_acl_default"] = _acl(1001)

    # -- names
    names = g.dir(root, b"names")
    for name in (b"n" * 255, b"\xff\xfe" + b"\x80" * 253, "ünïcødé-ñ".encode(), b"with space",
                 b"new\nline", b"back\\slash", b"equal=sign", b"-dash", b"..dots", b"%41",
                 b"tab\there", b"@at"):
        g.file(names, name, name[:40])
    g.dir(names, b"d" * 255)

    # -- hard links (inline, external, empty, symlink, device)
    hl = g.dir(root, b"hardlinks")
    a = g.file(hl, b"inline-a", b"linked inline", nlink=3)
    hl.children[b"inline-b"] = HardLink(a)  # type: ignore[index]
    g.dir(hl, b"sub").children[b"inline-c"] = HardLink(a)  # type: ignore[index]
    b = g.file(hl, b"external-a", rng.randbytes(10000), nlink=2)
    hl.children[b"external-b"] = HardLink(b)  # type: ignore[index]
    e = g.file(hl, b"empty-a", b"", nlink=2)
    hl.children[b"empty-b"] = HardLink(e)  # type: ignore[index]
    s = g.symlink(hl, b"symlink-a", b"inline-a", nlink=2)
    hl.children[b"symlink-b"] = HardLink(s)  # type: ignore[index]
    c = g.special(hl, b"fifo-a", stat.S_IFIFO, nlink=2)
    hl.children[b"fifo-b"] = HardLink(c)  # type: ignore[index]

    # -- depth and bulk
    d = root
    for i in range(40):
        d = g.dir(d, b"deep%02d" % i)
    g.file(d, b"bottom", b"deep file")
    bulk_dir = g.dir(root, b"bulk")
    big_dir = g.dir(bulk_dir, b"one-big-dir")
    subs = [g.dir(bulk_dir, b"sub%02d" % i) for i in range(40)]
    for i in range(bulk):
        parent = big_dir if i % 3 == 0 else subs[i % 40]
        name = b"entry-%05d-" % i + b"x" * rng.randrange(60)
        r = i % 10
        if r < 6:
            g.file(parent, name, rng.randbytes(rng.choice((0, 5, 40, 64, 65, 300, 5000))))
        elif r < 8:
            g.symlink(parent, name, b"../target-%d" % i)
        elif r < 9:
            g.dir(parent, name)
        else:
            g.special(parent, name, stat.S_IFIFO)
    return g.tree


def write_objects(objects: dict[bytes, bytes], basedir: str | os.PathLike[str]) -> None:
    """Put every object at ``basedir/ab/cdef...``."""
    for digest, data in objects.items():
        path = os.path.join(basedir, object_path(digest))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


# ------------------------------------------------------------------------------------------------
# on disk
# ------------------------------------------------------------------------------------------------

def materialize(tree: GenTree, path: str | os.PathLike[str]) -> None:
    """Create ``tree`` on disk at ``path`` (an existing empty directory): data, owners, modes,
    mtimes, xattrs, hard links. Needs root (devices, trusted.* xattrs, chown)."""
    base = os.fsencode(path)
    made: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Node]] = []

    def attrs(p: bytes, node: Node) -> None:
        for key, value in node.xattrs.items():
            os.setxattr(p, key, value, follow_symlinks=False)
        os.chown(p, node.uid, node.gid, follow_symlinks=False)
        if not stat.S_ISLNK(node.mode):
            os.chmod(p, node.mode & 0o7777)

    def walk(p: bytes, node: Node) -> None:
        for name, child in sorted((node.children or {}).items()):
            cp = p + b"/" + name
            if isinstance(child, HardLink):
                continue
            kind = child.mode & S_IFMT
            if kind == stat.S_IFDIR:
                os.mkdir(cp, 0o700)
                walk(cp, child)
                dirs.append((cp, child))
                continue
            if kind == stat.S_IFREG:
                data = child.content or tree.data.get(id(child), b"")
                with open(cp, "wb") as f:
                    f.write(data)
            elif kind == stat.S_IFLNK:
                os.symlink(child.payload or b"", cp)
            else:
                os.mknod(cp, kind | 0o600, child.rdev)
            attrs(cp, child)
            made[id(child)] = cp
        for name, child in sorted((node.children or {}).items()):
            if isinstance(child, HardLink):
                target = child
                while isinstance(target, HardLink):
                    target = target.target  # type: ignore[assignment]
                os.link(made[id(target)], p + b"/" + name, follow_symlinks=False)

    walk(base, tree.root)
    for p, node in made_items(made, tree):
        os.utime(p, ns=(0, node.mtime_sec * 10**9 + node.mtime_nsec), follow_symlinks=False)
    dirs.append((base, tree.root))
    for p, node in dirs:                      # children first, so their creation is done
        attrs(p, node)
        os.utime(p, ns=(0, node.mtime_sec * 10**9 + node.mtime_nsec))


def made_items(made: dict[int, bytes], tree: GenTree):
    nodes = {id(n): n for _, n in _iter_nodes(tree.root)}
    for key, p in made.items():
        yield p, nodes[key]


def _iter_nodes(root: Node):
    stack = [(b"", root)]
    while stack:
        p, node = stack.pop()
        yield p, node
        for name, child in (node.children or {}).items():
            if isinstance(child, Node):
                stack.append((p + b"/" + name, child))


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot_dir(path: str | os.PathLike[str], *, read_errors: dict[bytes, int] | None = None
                 ) -> dict[bytes, Rec]:
    """Records of every path below ``path`` (keys ``b"/"``, ``b"/a"``, ...). Regular files are
    read; when ``read_errors`` is given, a file that cannot be read is noted there (errno) and
    gets ``sha=None`` instead of raising."""
    base = os.fsencode(path)
    raw: dict[bytes, tuple[os.stat_result, str | None, bytes | None, dict[bytes, bytes]]] = {}

    def visit(rel: bytes, full: bytes) -> None:
        st = os.lstat(full)
        xattrs = {}
        for key in os.listxattr(full, follow_symlinks=False):
            k = os.fsencode(key)
            xattrs[k] = os.getxattr(full, k, follow_symlinks=False)
        sha = target = None
        if stat.S_ISREG(st.st_mode):
            try:
                sha = _file_sha(full)
            except OSError as exc:
                if read_errors is None:
                    raise
                read_errors[rel] = exc.errno or 0
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
        raw[rel] = (st, sha, target, xattrs)
        if stat.S_ISDIR(st.st_mode):
            for entry in os.scandir(full):
                visit(rel.rstrip(b"/") + b"/" + entry.name, entry.path)  # type: ignore[operator]

    visit(b"/", base)
    groups: dict[tuple[int, int], bytes] = {}
    for rel, (st, *_rest) in sorted(raw.items()):
        groups.setdefault((st.st_dev, st.st_ino), rel)
    out = {}
    for rel, (st, sha, target, xattrs) in raw.items():
        kind = KIND[stat.S_IFMT(st.st_mode)]
        is_dir = kind == "dir"
        out[rel] = Rec(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                       None if is_dir else st.st_size, sha, target,
                       st.st_rdev if kind in ("chr", "blk") else 0,
                       tuple(sorted(xattrs.items())), st.st_nlink,
                       rel if is_dir else groups[(st.st_dev, st.st_ino)])
    return out


def snapshot_tree(tree: GenTree) -> dict[bytes, Rec]:
    """The records ``snapshot_dir`` gives for ``materialize(tree)`` (as a source, not mounted)."""
    first: dict[int, bytes] = {}
    entries: list[tuple[bytes, Node]] = []
    stack: list[tuple[bytes, Node | HardLink]] = [(b"/", tree.root)]
    while stack:
        rel, entry = stack.pop()
        node = entry
        while isinstance(node, HardLink):
            node = node.target  # type: ignore[assignment]
        entries.append((rel, node))  # type: ignore[arg-type]
        if isinstance(entry, Node) and entry.children is not None:
            for name, child in entry.children.items():
                stack.append((rel.rstrip(b"/") + b"/" + name, child))
    for rel, node in sorted(entries):
        first.setdefault(id(node), rel)
    out = {}
    for rel, node in entries:
        kind = KIND[node.mode & S_IFMT]
        size: int | None = None
        sha = target = None
        if kind == "reg":
            data = node.content if node.content is not None else tree.data.get(id(node), b"")
            size, sha = len(data), _sha(data)
        elif kind == "lnk":
            target = node.payload
            size = len(target or b"")
        elif kind != "dir":
            size = 0
        if kind == "dir":
            nlink = 2 + sum(1 for c in node.children.values()  # type: ignore[union-attr]
                            if isinstance(c, Node) and c.is_dir())
        else:
            nlink = node.nlink
        out[rel] = Rec(kind, node.mode & 0o7777, node.uid, node.gid,
                       node.mtime_sec * 10**9 + node.mtime_nsec, size, sha, target,
                       node.rdev if kind in ("chr", "blk") else 0,
                       tuple(sorted(node.xattrs.items())), nlink,
                       rel if kind == "dir" else first[id(node)])
    return out


#: what a composefs mount shows for an overlay whiteout (chardev 0/0) of the source
WHITEOUT_XATTRS = {b"trusted.overlay.whiteout": b"", b"user.overlay.whiteout": b""}
#: ... and on its directory (format version 1 adds the opaque markers)
WHITEOUTS_DIR_XATTRS = {b"trusted.overlay.whiteouts": b"", b"user.overlay.whiteouts": b""}
OPAQUE_DIR_XATTRS = {b"trusted.overlay.opaque": b"x", b"user.overlay.opaque": b"x"}


def as_mounted(records: dict[bytes, Rec], version: int = 1) -> dict[bytes, Rec]:
    """What a composefs mount of an image built from ``records`` shows.

    composefs stores a whiteout (chardev 0/0) as an empty regular file carrying escaped
    ``overlay.whiteout`` xattrs and marks its directory (``overlay.whiteouts``, in format 1 also
    ``overlay.opaque`` = ``x``); overlayfs shows the escaped ``trusted.overlay.*`` xattrs of the
    image unescaped, so the mount has a regular file with ``trusted.overlay.whiteout`` and
    ``user.overlay.whiteout``. Everything else shows as it was."""
    out = dict(records)
    for rel, rec in records.items():
        if rec.kind == "chr" and rec.rdev == 0:
            x = dict(rec.xattrs)
            x.update(WHITEOUT_XATTRS)
            out[rel] = replace(rec, kind="reg", size=0, sha=_sha(b""), rdev=0,
                               xattrs=tuple(sorted(x.items())))
            parent = rel.rsplit(b"/", 1)[0] or b"/"
            p = out[parent]
            px = dict(p.xattrs)
            px.update(WHITEOUTS_DIR_XATTRS)
            if version >= 1:
                px.update(OPAQUE_DIR_XATTRS)
            out[parent] = replace(p, xattrs=tuple(sorted(px.items())))
    return out


def without_hardlinks(records: dict[bytes, Rec]) -> dict[bytes, Rec]:
    """The records as mkcomposefs 1.0.8 stores a directory source by default: every path of a
    non-directory is its own inode with nlink 1."""
    return {rel: rec if rec.kind == "dir" else replace(rec, nlink=1, link_group=rel)
            for rel, rec in records.items()}


def diff(expected: dict[bytes, Rec], actual: dict[bytes, Rec], *,
         ignore: tuple[str, ...] = (), limit: int = 30) -> list[str]:
    """Human-readable differences (at most ``limit``); ``ignore`` names Rec fields to skip."""
    problems: list[str] = []
    for rel in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing {rel!r}")
    for rel in sorted(actual.keys() - expected.keys()):
        problems.append(f"unexpected {rel!r}: {actual[rel].show()}")
    for rel in sorted(expected.keys() & actual.keys()):
        e, a = expected[rel], actual[rel]
        for name in Rec.__dataclass_fields__:
            if name in ignore:
                continue
            if getattr(e, name) != getattr(a, name):
                ev, av = getattr(e, name), getattr(a, name)
                if name == "xattrs":
                    ed, ad = dict(ev), dict(av)
                    ev = {k: v for k, v in ed.items() if ad.get(k) != v}
                    av = {k: v for k, v in ad.items() if ed.get(k) != v}
                problems.append(f"{rel!r} {name}: expected {ev!r}, got {av!r}")
    more = [f"... {len(problems) - limit} more"] if len(problems) > limit else []
    return problems[:limit] + more
