"""The digest cache of directory builds (``mkcomposefs --digest-cache=PATH``).

A rebuild from a tree that barely changed should not read the tree again. The cache remembers,
per regular file hashed by an earlier build, its ``(inode, size, mtime, ctime)`` and fs-verity
digest; a file whose ``lstat`` still gives exactly those values is not read again. A file of
1 to 64 bytes, whose contents the image holds inline and a build always reads, is recorded
with ``NO_DIGEST``: the next build then knows whether it changed (``mkcfs.build.reuse``).

Why a hit is never a wrong digest
---------------------------------
* **ctime.** Every change of a file's data through the file system sets its ctime to the current
  time, and ctime cannot be set by a user (``touch -d`` and ``utimensat`` restore the mtime, not
  the ctime). A file replaced by another that reuses the inode number was created later, so its
  ctime differs too. The key compares size, mtime and ctime to the nanosecond.
* **Racy entries** (git's index has the same rule): a file changed in the same clock tick in
  which it was recorded would keep its ctime. An entry is therefore only trusted when its ctime
  is more than ``RACY_MARGIN_NS`` older than the start of the build that hashed it (coarse kernel
  clocks tick every few milliseconds; some file systems store whole seconds); a racy entry is
  recorded with ``UNTRUSTED`` for its ctime, which no lookup answers from: such a file is
  hashed again next time. The record only tells the next build which digest the last image
  had for that file (``previous``, for ``mkcfs.build.reuse``).
* **Another machine, boot or file system.** Inode numbers mean something only on one mounted
  file system. Each part of the cache (a *section*, one per source directory) is tied to the
  machine (``/etc/machine-id``), the boot (``boot_id``: device numbers of e.g. tmpfs and overlayfs
  are handed out again after a reboot), and the source's device number, file system id
  (``statvfs`` ``f_fsid``) and root inode. Any difference: the section is not used. Only files on
  the source root's device are cached (a mount point inside the tree is read as before).
* **A damaged file** (bad magic, wrong length, CRC-32 mismatch) is ignored as a whole; so is a
  file that cannot be read. The cache never makes a build fail.
* With a digest store, a hit is used only when the store still holds the object (an ``lstat``);
  otherwise the file goes through the store as usual.

Xattrs known from a hit
-----------------------
A record also says whether the build that made it saw the file without any xattr
(``listxattr``, called after the ``lstat`` that gave the record's ctime, listed no name).
Setting or removing an xattr sets the ctime as a change of the data does, so a hit on such a
record means the file still has none, and the walk does not ask again. A file with xattrs, or
walked without reading them (``--skip-xattrs``), is recorded without that knowledge
(``XATTRS_UNSEEN``) and asked every time.

The image of the last build
---------------------------
A section also remembers, for the last image built from its tree, a key of everything the image
was made of and the image's fs-verity digest (``image_memo``, ``remember_image``): a rebuild
whose key is the same, into an image file that still holds exactly that image, need not make it
again (``mkcfs.build.reuse``). The key is a SHA-256 of the walk's view of the tree, including
every file's digest, of the options and of the code that writes images; it holds no secret
and proves nothing by itself: the image file is checked against the digest.

Crash safety, concurrency, bounds
---------------------------------
The cache is one file, rewritten whole through a temporary file and ``rename`` (so a killed build
leaves the old cache or the new one, never a mix), mode 0600. Writing it re-reads the current
file first and keeps the other sections, so concurrent builds of different trees keep each
other's work (two builds that save at the same instant can lose one's section: a slower next
build, never a wrong one). Each build of a tree replaces that tree's section with the files it
saw, so entries of files no longer seen are dropped (a build that found every file of the
section and nothing else writes nothing, unless the section was last written a day ago); the
least recently used sections are dropped beyond ``MAX_SECTIONS`` sections or ``MAX_ENTRIES``
entries in all.

Why one file and not ``sqlite3``: measured on 140k files (``/usr``), writing the whole cache
takes 0.08 s as one file and 1.05 s as an sqlite table, loading 0.02 s against 0.65 s, and one
sqlite point query costs ~14 µs against ~0.2 µs for the dict lookup here (inode -> record
index, built once when the section is loaded: ~10 ms for 115k records, cheaper than a binary
search per file). A hit is remembered as a mark on the old record, which ``save`` copies as
it is: an unchanged tree costs no per-file bookkeeping at all.

Format (little-endian): ``MAGIC``, CRC-32 of everything after this field (u32), section count
(u32); per section a header (``_SECTION``: identity, last use, record count, the last image's
key and digest, zeros for none) and ``count`` records of 8 u64 sorted by inode: inode, size
(bit 63: ``XATTRS_UNSEEN``), mtime (ns, two's complement), ctime (ns, two's complement), digest
(32 bytes).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
import re
from array import array
from bisect import bisect_left

from mkcfs.tree import Node

__all__ = ["DigestCache", "default_cache_path", "MAGIC", "RACY_MARGIN_NS", "MAX_SECTIONS", "MAX_ENTRIES",
           "NO_DIGEST", "UNTRUSTED", "XATTRS_UNSEEN", "source_identity"]

#: (version 3: ``XATTRS_UNSEEN``; a version 2 file is ignored: its records lack that bit)
MAGIC = b"MKCFSDC\x03"
_HEAD = struct.Struct("<8sII")                    # magic, crc32, section count
#: machine id, boot id, st_dev, root inode, f_fsid, last used (ns), record count, the key
#: and the fs-verity digest of the last image built from the tree (zeros: none)
_SECTION = struct.Struct("<16s16sQQQQQ32s32s")
_NO_MEMO = bytes(64)
_RECORD = 64                                      # bytes: 4 u64 + a 32-byte digest
_WORDS = _RECORD // 8
_U64 = (1 << 64) - 1
#: entries whose ctime is this close to (or after) the build's start are not trusted
RACY_MARGIN_NS = 3_000_000_000
#: the ctime word of a record that no lookup answers from (a racy entry); no file is looked
#: up with this ctime (-1 ns, whose masked value it is: ``lookup`` refuses it)
UNTRUSTED = (1 << 64) - 1
#: the digest of the record of a file of at most 64 bytes (read by every build: its record only
#: tells whether it changed)
NO_DIGEST = bytes(32)
#: set in the size word of a record whose file the build did not see without xattrs (it had
#: some, or they were not read): a hit on it does not tell that the file has none
XATTRS_UNSEEN = 1 << 63
MAX_SECTIONS = 64
#: a run of old records that a lookup hit (``DigestCache._hit_marks``)
_MARKED_RUN = re.compile(b"\x01+")
#: an unchanged section is rewritten (to refresh its last use) only when older than this
REFRESH_NS = 24 * 3600 * 10**9
MAX_ENTRIES = 4_000_000
#: the name of the default cache inside a digest store
STORE_CACHE_NAME = ".mkcfs-digest-cache"


def default_cache_path(store: str, source: str) -> str | None:
    """The cache a build with digest store ``store`` uses by default: a file in the store, or
    None when the store lies inside ``source`` (the cache file would then appear in the next
    build's tree and change its image)."""
    real_store = os.path.realpath(store)
    real_source = os.path.realpath(source)
    if os.path.commonpath([real_store, real_source]) == real_source:
        return None
    return os.path.join(store, STORE_CACHE_NAME)


def _read_id(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip().replace(b"-", b"")
        return bytes.fromhex(text.decode("ascii"))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return bytes(16)


def source_identity(root: bytes, st: os.stat_result) -> bytes:
    """The identity a section must match to be used: machine, boot, device, fs id, root inode.

    An unknown machine or boot id (no ``/etc/machine-id``, no ``/proc``) gives no identity:
    nothing is cached then."""
    machine = _read_id("/etc/machine-id")
    boot = _read_id("/proc/sys/kernel/random/boot_id")
    if not any(machine) or not any(boot):
        return b""
    try:
        fsid = os.statvfs(root).f_fsid & _U64
    except OSError:
        return b""
    return machine + boot + struct.pack("<QQQ", st.st_dev, st.st_ino, fsid)


class _Section:
    """One source tree's records as loaded: the raw bytes (a view of the file as read: only
    the section a build uses is decoded, in ``words`` and its column of inode numbers
    ``inodes``, the others are written back as they are)."""

    __slots__ = ("identity", "last_used", "raw", "memo", "_words")

    def __init__(self, identity: bytes, last_used: int, raw: bytes | memoryview,
                 memo: bytes = _NO_MEMO) -> None:
        self.identity = identity
        self.last_used = last_used
        self.raw = raw
        #: the last image's key and digest (64 bytes), zeros for none
        self.memo = memo
        self._words: array[int] | None = None

    @property
    def words(self) -> array[int]:
        """The records as 8 u64 words each."""
        if self._words is None:
            self._words = array("Q")
            self._words.frombytes(self.raw)
        return self._words

    @property
    def inodes(self) -> array[int]:
        return self.words[0::_WORDS]

    def drop_words(self) -> None:
        """Free the decoded ``words`` (decoded again if asked for)."""
        self._words = None


def _parse(data: bytes) -> list[_Section] | None:
    """The sections of a cache file, or None when it is not a whole, intact cache file."""
    if len(data) < _HEAD.size:
        return None
    magic, crc, count = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or zlib.crc32(memoryview(data)[12:]) != crc:
        return None
    sections = []
    pos = _HEAD.size
    view = memoryview(data)
    try:
        for _ in range(count):
            machine, boot, dev, ino, fsid, last_used, n, key, digest = _SECTION.unpack_from(
                data, pos)
            pos += _SECTION.size
            end = pos + n * _RECORD
            if end > len(data):
                return None
            identity = machine + boot + struct.pack("<QQQ", dev, ino, fsid)
            sections.append(_Section(identity, last_used, view[pos:end], key + digest))
            pos = end
    except struct.error:
        return None
    return sections if pos == len(data) else None


def _load(path: str) -> list[_Section]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return _parse(data) or []


class DigestCache:
    """The cache at ``path`` for the build of the source directory ``root`` (``st`` = its
    ``lstat``). ``lookup`` answers from the previous build's records, ``record`` collects this
    build's, ``save`` writes them (errors writing are ignored: the cache is an optimisation)."""

    def __init__(self, path: str | bytes, root: bytes, st: os.stat_result) -> None:
        self.path = os.fsdecode(path)
        self.dev = st.st_dev
        self.identity = source_identity(root, st)
        self.started = time.time_ns()
        self._old: _Section | None = None
        #: the old section's records as bytes (for ``lookup``; also its ``raw``)
        self._old_raw = b""
        if self.identity:
            for section in _load(self.path):
                if section.identity == self.identity:
                    self._old_raw = bytes(section.raw)   # a copy, not a view of the whole file
                    section.raw = self._old_raw
                    self._old = section
                    break
        #: the old section's inode -> record index (records are unique by inode)
        self._index: dict[int, int] = {}
        #: the old section's records as words (for ``lookup``)
        self._old_words: array[int] = array("Q")
        if self._old is not None:
            inodes = self._old.inodes
            self._index = dict(zip(inodes, range(len(inodes))))
            self._old_words = self._old.words
        #: this build's new records: 4 words (inode, size, mtime, ctime) + digests, walk order
        self._words = array("Q")
        self._digests = bytearray()
        self._pending_words = array("Q")
        self._pending_nodes: list[Node] = []
        self.hits = 0
        #: which of the old section's records a lookup returned: they stay in the section
        #: (all, and nothing new: the section is unchanged and need not be written again)
        self._hit_marks = bytearray(len(self._index))
        #: the last image's key and digest, to save (``remember_image``)
        self._memo = self._old.memo if self._old is not None else _NO_MEMO

    @property
    def image_memo(self) -> tuple[bytes, bytes] | None:
        """``(key, fs-verity digest)`` of the last image built from this tree (see the module
        docstring), or None."""
        memo = self._memo
        return None if memo == _NO_MEMO else (memo[:32], memo[32:])

    def remember_image(self, key: bytes, digest: bytes) -> None:
        """Remember that the image with fs-verity ``digest`` was built from the tree with
        ``key`` (saved by ``save``)."""
        if len(key) != 32 or len(digest) != 32:
            raise ValueError("an image key and digest are 32 bytes each")
        self._memo = key + digest

    def lookup(self, st: os.stat_result) -> tuple[bytes, bool] | None:
        """``(digest, whether the file has no xattrs)`` as recorded for the file with
        ``lstat`` result ``st``, if every key matches (see the module docstring)."""
        i = self._index.get(st.st_ino)
        if i is None or st.st_dev != self.dev:
            return None
        words = self._old_words
        base = i * _WORDS
        size = words[base + 1]
        if ((size != st.st_size and size != st.st_size | XATTRS_UNSEEN)
                or words[base + 2] != st.st_mtime_ns & _U64
                or words[base + 3] != st.st_ctime_ns & _U64 or words[base + 3] == UNTRUSTED):
            return None
        if not self._hit_marks[i]:
            self.hits += 1
            self._hit_marks[i] = 1
        return self._old_raw[i * _RECORD + 32:(i + 1) * _RECORD], size == st.st_size

    def end_lookups(self) -> None:
        """The walk is over: drop what ``lookup`` needs (~20 MB for 115k records), which a
        cache kept until after the image is made (``save`` then) would hold in vain."""
        self._index = {}
        self._old_words = array("Q")
        if self._old is not None:
            self._old.drop_words()   # decoded again if ``save`` needs it

    def previous(self, st: os.stat_result) -> tuple[bytes, int, int] | None:
        """``(digest, size, mtime in ns)`` the previous build recorded for the inode of
        ``lstat`` result ``st``, whatever the file is now (not the file's: what the last
        image said of the file that had this inode; see ``mkcfs.build.reuse``), or None.
        The digest of a file of at most 64 bytes is ``NO_DIGEST``."""
        i = self._index.get(st.st_ino)
        if i is None or st.st_dev != self.dev:
            return None
        words = self._old_words
        mtime = words[i * _WORDS + 2]
        return (self._old_raw[i * _RECORD + 32:(i + 1) * _RECORD],
                words[i * _WORDS + 1] & ~XATTRS_UNSEEN,
                mtime - (1 << 64) if mtime >> 63 else mtime)

    def cacheable(self, st: os.stat_result) -> bool:
        """Whether a file with ``lstat`` result ``st`` can be recorded: on the source's
        device (a racy one is recorded untrusted: see the module docstring)."""
        return st.st_dev == self.dev and bool(self.identity)

    def _record_words(self, st: os.stat_result, no_xattrs: bool) -> tuple[int, int, int, int]:
        """The four words of the record of ``st``: inode, size (with ``XATTRS_UNSEEN`` unless
        ``no_xattrs``), mtime, and ctime (``UNTRUSTED`` for a racy entry)."""
        ctime = st.st_ctime_ns
        return (st.st_ino, st.st_size if no_xattrs else st.st_size | XATTRS_UNSEEN,
                st.st_mtime_ns & _U64,
                ctime & _U64 if ctime < self.started - RACY_MARGIN_NS else UNTRUSTED)

    def record(self, st: os.stat_result, digest: bytes, no_xattrs: bool = False) -> None:
        """Remember ``digest`` for the file with ``lstat`` result ``st`` (see ``cacheable``),
        and ``no_xattrs``: whether ``listxattr``, called after that ``lstat``, listed none; a
        file ``lookup`` found needs no call: its record is kept."""
        self._words.extend(self._record_words(st, no_xattrs))
        self._digests += digest

    def record_inline(self, st: os.stat_result, no_xattrs: bool = False) -> None:
        """Remember the file of at most 64 bytes with ``lstat`` result ``st`` (``NO_DIGEST``:
        see the module docstring; ``no_xattrs`` as for ``record``)."""
        self.record(st, NO_DIGEST, no_xattrs)

    def record_later(self, st: os.stat_result, node: Node, no_xattrs: bool = False) -> None:
        """Remember the file with ``lstat`` result ``st`` whose digest the hashing workers will
        put in ``node.digest`` (see ``collect``; ``no_xattrs`` as for ``record``)."""
        self._pending_words.extend(self._record_words(st, no_xattrs))
        self._pending_nodes.append(node)

    def collect(self) -> None:
        """Record the digests the workers found for the files given to ``record_later``."""
        digests = self._digests
        for node in self._pending_nodes:
            digest = node.digest
            if digest is None or len(digest) != 32:   # pragma: no cover - a worker bug
                raise AssertionError("a hashed file has no digest")
            digests += digest
        self._words += self._pending_words
        self._pending_words = array("Q")
        self._pending_nodes = []

    @property
    def expects_hits(self) -> bool:
        """Whether this build has a previous build's records to use."""
        return bool(self._index)

    def take_updates(self) -> tuple[list[tuple[int, int]], bytes, bytes]:
        """What this copy learnt since the last call, for ``apply_updates`` in another copy
        (a forked worker walking part of the tree): the runs ``(start, end)`` of old records
        hit, and the new records' words and digests (after ``collect``). Forgets them here."""
        marks = self._hit_marks
        runs = [run.span() for run in _MARKED_RUN.finditer(marks)]
        for start, end in runs:
            marks[start:end] = bytes(end - start)
        words, digests = self._words.tobytes(), bytes(self._digests)
        self._words = array("Q")
        self._digests = bytearray()
        return runs, words, digests

    def apply_updates(self, updates: tuple[list[tuple[int, int]], bytes, bytes]) -> None:
        """Take in what ``take_updates`` gave in another copy of this cache."""
        runs, words, digests = updates
        marks = self._hit_marks
        for start, end in runs:
            self.hits += marks.count(0, start, end)
            marks[start:end] = b"\x01" * (end - start)
        self._words.frombytes(words)
        self._digests += digests

    def _body(self) -> tuple[list[bytes | bytearray | memoryview], int]:
        """This build's section, in pieces: the old records a lookup hit (copied as they are)
        merged with the new ones, sorted by inode, one record per inode; and its record
        count."""
        words, digests = self._words, self._digests
        inodes = words[0::4]
        order = sorted(range(len(inodes)), key=inodes.__getitem__)
        old = self._old
        marks = self._hit_marks
        old_inodes = old.inodes if old is not None else array("Q")
        raw = memoryview(self._old_raw)
        pieces: list[bytes | bytearray | memoryview] = []
        count = 0
        done = 0   # old records before this index are merged already

        def old_records(end: int) -> None:
            nonlocal count
            for run in _MARKED_RUN.finditer(marks, done, end):
                pieces.append(raw[run.start() * _RECORD:run.end() * _RECORD])
                count += run.end() - run.start()

        last = -1
        for i in order:
            ino = inodes[i]
            if ino == last:   # the same file under two names: once is enough
                continue
            last = ino
            at = bisect_left(old_inodes, ino, done)
            if at < len(old_inodes) and old_inodes[at] == ino and marks[at]:
                continue   # the old record of this file was hit: it stays
            old_records(at)
            done = at
            pieces.append(words[4 * i:4 * i + 4].tobytes())
            pieces.append(digests[32 * i:32 * i + 32])
            count += 1
        old_records(len(marks))
        return pieces, count

    def save(self) -> None:
        """Write this build's section, keeping the other sections of the file as it is now."""
        if not self.identity:
            return
        old = self._old
        if (old is not None and self._hit_marks.count(0) == 0
                and not self._words and not self._pending_nodes and self._memo == old.memo
                and time.time_ns() - old.last_used < REFRESH_NS):
            return   # every file hit and nothing new: the file already says all of it
        body, count = self._body()
        # (the file is put together from views of its pieces: one copy of it in memory, which
        # matters when this runs next to a large build's image)
        sections = [(self.identity, time.time_ns(), count, self._memo, body)]
        total = count
        others = sorted((s for s in _load(self.path) if s.identity != self.identity),
                        key=lambda s: s.last_used, reverse=True)
        for section in others:
            entries = len(section.raw) // _RECORD
            if len(sections) >= MAX_SECTIONS or total + entries > MAX_ENTRIES:
                break
            sections.append((section.identity, section.last_used, entries, section.memo,
                             [section.raw]))
            total += entries
        parts: list[bytes | bytearray | memoryview] = []
        for identity, last_used, entries, memo, pieces in sections:
            machine, boot = identity[:16], identity[16:32]
            dev, ino, fsid = struct.unpack("<QQQ", identity[32:])
            parts.append(_SECTION.pack(machine, boot, dev, ino, fsid, last_used, entries,
                                       memo[:32], memo[32:]))
            parts += pieces
        crc = zlib.crc32(struct.pack("<I", len(sections)))   # the CRC covers the count too
        for part in parts:
            crc = zlib.crc32(part, crc)
        data = b"".join([_HEAD.pack(MAGIC, crc, len(sections)), *parts])
        del parts, sections, others, body
        from mkcfs.fsutil import write_atomically
        try:
            write_atomically(self.path, data, mode=0o600)
        except OSError:
            pass   # an unwritable cache costs time next build, nothing else
