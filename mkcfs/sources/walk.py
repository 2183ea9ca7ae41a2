"""Directory source: read a directory tree into a ``Node`` tree, as ``mkcomposefs DIR`` does.

``walk_directory(path, options)`` gives the tree from which ``build_image`` writes the same bytes
as mkcomposefs 1.0.8 given the same directory and options:

* Nothing is followed: the SOURCE itself is ``lstat``ed and must be a directory (a symlink to a
  directory is an error; ``link/`` with a trailing slash names the directory and works), and every
  entry below it is ``lstat``ed once (``os.listdir``; ``.`` and ``..`` are not listed).
* Each node gets mode (type and all permission bits), uid, gid, rdev and size from ``lstat``, and
  the mtime in nanoseconds, or 0 with ``use_epoch``. The root node describes SOURCE itself.
  Regular files, directories, symlinks (target from ``readlink``), character and block devices,
  FIFOs and sockets are kept; ``skip_devices`` leaves out character and block devices (which also
  drops overlay whiteouts, so the image stays format version 0).
* Extended attributes come from ``listxattr``/``getxattr`` without following symlinks: all of
  them (user., trusted. -- readable by root only --, security., system.posix_acl_*), only
  ``user.*`` ones with ``user_xattrs``, none with ``skip_xattrs``. A filesystem without xattr
  support (ENOTSUP) gives none. More xattrs than libcomposefs accepts on one inode is an error
  (ERANGE), as in mkcomposefs.
* Regular files: an empty one is read not at all; one of 1..64 bytes is read and stored inline;
  a larger one gets its fs-verity digest, and payload = its object path ``ab/cdef…``. Those reads
  and hashes run on ``threads`` worker processes (``mkcfs.store.digests``) while the walk goes on;
  with ``digest_store`` each such file is also put into that object store (``mkcfs.store.objects``).
  A rebuild that expects to find most files in the digest cache (``mkcfs.store.cache``) has
  little to read, so those workers walk parts of the tree instead and send them back packed
  (``_Walker.walk_shared``; not with ``hardlinks``): the same tree. Such a walk also gives
  ``WalkInProgress.tree_key``, a SHA-256 of everything it saw (each directory's entries with
  their metadata, xattrs, symlink targets, inline contents and digests, and the options that
  shape them), which tells a rebuild that the tree is the one its last image was made from
  (``mkcfs.build.reuse``).
  A store inside the source tree is filled only after the walk, and the store directory is
  created only when the first object is stored, as mkcomposefs 1.0.8 does: the image lists the
  store (and its objects) exactly when it existed before the build.
* **Hard links.** mkcomposefs 1.0.8 does not detect hard links in a directory source: every path
  is a separate inode with nlink 1 (a file with several links is still read only once here). That
  is the default, for byte identity. With ``hardlinks=True``, entries other than directories
  that share ``(st_dev, st_ino)`` become one inode: the first of them in depth-first order with
  bytewise-sorted names is the ``Node`` and the others are ``HardLink`` entries to it, and the
  node's nlink is the number of links found in the tree (links from outside the tree are not
  counted).

Errors are ``WalkError`` with a one-line message naming the path: a missing or non-directory
SOURCE, an unreadable directory or file, a file that changes size or vanishes while it is read,
a digest store that cannot be used. Nothing is left half-written in the store.
"""

from __future__ import annotations

import errno
import marshal
import os
import stat
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, wait
from collections.abc import Callable
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from fsverity import object_path

from mkcfs.store.digests import (DigestPool, cancelled_in_worker, copy_results, fill_nodes,
                                 run_batch_in_worker, store_in_worker)
from mkcfs.store.reading import INLINE_MAX
from mkcfs.errors import BuildInputError, WalkError, walk_error
from mkcfs.build.overlay import XattrBudget, XattrLimitError
from mkcfs.progress import Progress
from mkcfs.store.reading import Cancelled, file_changed
from mkcfs.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, HardLink, Node, iter_tree

if TYPE_CHECKING:  # pragma: no cover
    from mkcfs.store.cache import DigestCache
    from mkcfs.store.objects import ObjectStore

__all__ = ["ChangedFile", "InodeEdit", "OldContent", "PreviousTree", "WalkInProgress",
           "WalkOptions", "start_walk", "walk_directory"]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR, _S_IFBLK = (S_IFMT, S_IFDIR, S_IFREG, S_IFLNK,
                                                           S_IFCHR, S_IFBLK)
_NO_XATTR_SUPPORT = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP))
_NS = 1_000_000_000
#: a shared walk (``_Walker.walk_shared``) hands out at least this many directories, found
#: breadth first in at most this many levels; a job gets at most ``_JOB_MAX_DIRS`` of them
#: (directories handed out at once go to at least ``_JOBS_PER_HAND_OUT`` jobs) and walks
#: about ``_JOB_ENTRIES`` entries (~80 ms) before it leaves the rest for other jobs. Each job
#: costs a round trip in which its worker waits (~1 ms, more while this process grafts): jobs
#: of 12000 entries walked an unchanged /usr in 0.68 s where jobs of 3000 took 0.74 s (0.33 s
#: both for /usr/share; medians of 10 interleaved runs)
_SHARED_MIN_DIRS = 16
_SHARED_MAX_LEVELS = 3
_JOB_MAX_DIRS = 64
_JOBS_PER_HAND_OUT = 8
_JOB_ENTRIES = 12000
#: files a worker of a shared walk reads in one ``run_batch``
_WORKER_BATCH = 256


class WalkOptions(NamedTuple):
    """What ``walk_directory`` reads (the mkcomposefs options of the same names).

    ``threads``: workers reading and hashing files (None: the CPUs this process may run on;
    they are processes, see ``mkcfs.store.digests.DigestPool``). ``digest_store``: object store
    directory to fill, or None. ``digest_cache``: digest cache file (``mkcfs.store.cache``) to
    use and update, or None. ``progress``: show a progress line on stderr (None: when
    stderr is a terminal). ``share_xattrs``: see the field."""

    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    hardlinks: bool = False
    threads: int | None = None
    digest_store: PathArg | None = None
    digest_cache: PathArg | None = None
    progress: bool | None = None
    #: nodes without xattrs share one empty dict (less memory and time for a big tree): only
    #: for a tree that nobody modifies, such as the one ``build_image_from`` is given
    share_xattrs: bool = False


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: ``_Walker.previous_tree_key``'s source of a small file's old contents: its path (one name
#: per level below the root) -> the contents, or None when unknown
OldContent = Callable[[list[bytes]], "bytes | None"]


class ChangedFile(NamedTuple):
    """A file the walk found changed since the digest cache recorded it."""

    #: the path of its directory, as walked
    directory: bytes
    #: its path, as names below the root
    names: list[bytes]
    #: the entries of its directory (it among them)
    siblings: dict[bytes, Any]
    node: Node
    #: the digest recorded for its inode; None for a file of at most 64 bytes
    previous: bytes | None
    #: the size and the mtime (ns) recorded
    previous_size: int
    previous_mtime: int


class InodeEdit(NamedTuple):
    """A changed file whose size or mtime changed too (``PreviousTree.inode_edits``)."""

    #: its path, as names below the root
    names: list[bytes]
    #: the size and mtime ``(s, ns)`` the last image has, and those it has now
    old_size: int
    old_mtime: tuple[int, int]
    size: int
    mtime: tuple[int, int]


class PreviousTree(NamedTuple):
    """The tree as it was before some files' contents changed (``previous_tree_key``)."""

    #: the tree key it had
    key: bytes
    #: ``(old digest, new digest)`` of the files larger than 64 bytes whose digest changed
    edits: list[tuple[bytes, bytes]]
    #: ``(path as names below the root, new contents)`` of the smaller files that changed
    inline_edits: list[tuple[list[bytes], bytes]]
    #: the changed files whose size or mtime changed too
    inode_edits: list[InodeEdit]


class _Walker:
    def __init__(self, options: WalkOptions, pool: DigestPool, progress: Progress | None,
                 cache: DigestCache | None = None, store: ObjectStore | None = None) -> None:
        self.options = options
        self.pool = pool
        self.cache = cache
        self.store = store
        self.progress = progress
        self.read_xattrs = not options.skip_xattrs
        self.user_only = options.user_xattrs
        #: the xattrs of a node without any (None: a new dict each)
        self.no_xattrs: dict[bytes, bytes] | None = {} if options.share_xattrs else None
        #: (dev, ino, size) -> node, for files with several links (read them once)
        self.seen: dict[tuple[int, int, int], Node] = {}
        #: hardlinks mode: (dev, ino) -> [(path, parent children, name, node)]
        self.links: dict[tuple[int, int], list[tuple[bytes, dict, bytes, Node]]] = {}
        #: shared int objects for the values many nodes have in common
        self.modes: dict[int, int] = {}
        self.mtimes: dict[int, tuple[int, int]] = {}
        #: a shared walk: the directories this process scanned, and (path, digest of its
        #: entries) of those the workers scanned (``tree_key``)
        self.own_dirs: list[tuple[bytes, Node]] = []
        self.dir_digests: list[tuple[bytes, bytes]] = []
        #: the files not found in the digest cache of which it had a record for their inode:
        #: (directory path, name, the digest recorded (None for inline contents), the size and
        #: the mtime in ns recorded), for ``changed_files``
        self.changed: list[tuple[bytes, bytes, bytes | None, int, int]] = []
        #: after ``run``: the source path and the root of its tree
        self.source: tuple[bytes, Node] | None = None
        self._changed_files: list[ChangedFile] | None = None

    # -- one inode --------------------------------------------------------------------------

    def xattrs(self, path: bytes) -> dict[bytes, bytes] | None:
        """The xattrs of ``path`` (not following a symlink), or None when it has none."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _NO_XATTR_SUPPORT:
                return None
            raise walk_error("error accessing", path, exc) from None
        if not names:
            return None
        result: dict[bytes, bytes] = {}
        budget = XattrBudget(result)
        fsencode = os.fsencode
        user_only = self.user_only
        for name in names:
            if user_only and not name.startswith("user."):
                continue
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENODATA or exc.errno in _NO_XATTR_SUPPORT:
                    continue   # removed since it was listed / not readable here: none
                raise walk_error("error accessing", path, exc) from None
            try:
                budget.set(fsencode(name), value)
            except XattrLimitError as exc:
                raise walk_error("error accessing", path, OSError(
                    exc.errno, os.strerror(exc.errno))) from None
        return result

    def node(self, path: bytes, st: os.stat_result) -> Node:
        """The node for an ``lstat`` result (no file contents)."""
        if self.options.use_epoch:
            sec = nsec = 0
        else:
            sec, nsec = divmod(st.st_mtime_ns, _NS)
        node = Node(st.st_mode, 1, st.st_uid, st.st_gid, st.st_rdev, st.st_size, sec, nsec)
        if self.read_xattrs:
            xattrs = self.xattrs(path)
            if xattrs:
                node.xattrs = xattrs
        return node

    # -- the tree ---------------------------------------------------------------------------

    def run(self, src: bytes, st: os.stat_result, shared: bool = False) -> Node:
        """The tree below ``src`` (``st``: its ``lstat``); ``shared``: parts of it are walked
        by the pool's worker processes (see ``walk_shared``)."""
        root = self.node(src, st)
        directories: list[tuple[bytes, Node]] = [(src, root)]
        if shared:
            self.walk_shared(directories)
        else:
            self.walk(directories)
        if self.options.hardlinks:
            self.resolve_links()
        # the walk's lookup tables are done with (this walker lives on for ``tree_key``; one
        # entry per distinct mtime is ~20 MB for /usr)
        self.seen, self.modes, self.mtimes = {}, {}, {}
        self.source = (src, root)
        return root

    def walk(self, queue: list[tuple[bytes, Node]]) -> None:
        """Walk the directories on ``queue`` and everything below them, breadth first and each
        directory in name order (``scan``): the order in which the image's inodes are
        numbered and laid out, so that the nodes, the files' digests (in that order from the
        pool) and what is made of them lie in memory in the order in which the image is made
        (depth first in directory order, flatten, plan and layout of a 54k-entry tree took
        ~20% longer: memory read out of order)."""
        pool = self.pool
        scan = self.scan
        count = self.count
        for path, node in queue:   # (the queue grows while it is walked)
            count(scan(path, node, queue))
            if pool.failed:
                break
        queue.clear()

    def walk_shared(self, stack: list[tuple[bytes, Node]]) -> None:
        """Walk with the pool's workers: a rebuild whose files are mostly in the digest cache
        reads almost nothing, so its walk (``lstat``, ``listxattr``, cache lookups: ~7 µs per
        entry) is the work, and the workers have none. This process walks the top levels
        breadth first until ``_SHARED_MIN_DIRS`` directories are found and hands them out in
        jobs (``_walk_in_worker``: a worker walks about ``_JOB_ENTRIES`` entries below them,
        reads their new and small files, and returns the subtrees packed with the
        directories it left for later); it grafts what comes back (~1 µs per entry) and hands
        out the directories left, so a big subtree is shared too. Same tree, same cache
        records as ``walk``."""
        frontier = stack
        for _ in range(_SHARED_MAX_LEVELS):
            if not frontier or len(frontier) >= _SHARED_MIN_DIRS:
                break
            below: list[tuple[bytes, Node]] = []
            for path, node in frontier:
                self.count(self.scan(path, node, below))
            self.own_dirs += frontier
            frontier = below
        running: dict[Future, list[tuple[bytes, Node]]] = {}
        call = self.pool.call
        where = b""   # a directory of the job being handed out or taken in, for an error

        def hand_out(directories: list[tuple[bytes, Node]]) -> None:
            nonlocal where
            per_job = min(_JOB_MAX_DIRS, max(1, len(directories) // _JOBS_PER_HAND_OUT))
            for i in range(0, len(directories), per_job):
                job = directories[i:i + per_job]
                where = job[0][0]
                running[call(_walk_in_worker, [path for path, _ in job])] = job

        try:
            hand_out(frontier)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    where = job[0][0]
                    left = self.graft(job, future.result())
                    if left:
                        hand_out(left)
        except BrokenExecutor as exc:   # a worker was killed (by the OOM killer, say)
            raise WalkError(f"error walking {os.fsdecode(where)}: a worker process died "
                            f"({exc})") from None

    def graft(self, job: list[tuple[bytes, Node]], packed: bytes) -> list[tuple[bytes, Node]]:
        """Put the subtrees a worker walked (``_walk_in_worker``) below the job's nodes; the
        directories it left for later, with their nodes."""
        count, directories, left_paths, updates, changed = marshal.loads(packed)
        self.count(count)
        self.changed += changed
        if updates is not None:
            assert self.cache is not None
            self.cache.apply_updates(updates)
        no_xattrs = self.no_xattrs
        Node_ = Node
        loads = marshal.loads
        join = os.path.join
        add_digest = self.dir_digests.append
        # one int object per distinct mode and mtime, as ``scan`` makes them (the entries
        # come without the sharing they had in the worker): ~10 MB less for /usr
        shared = self.modes.setdefault
        #: the directories found and not filled yet, by path
        found: dict[bytes, Node] = dict(job)
        for path, entries, digest in directories:   # each after its parent
            add_digest((path, digest))
            children: Any = found.pop(path).children
            for (name, mode, uid, gid, rdev, size, sec, nsec, payload, content, digest,
                 xattrs) in loads(entries):
                node = Node_(shared(mode, mode), 1, uid, gid, rdev, size, shared(sec, sec),
                             shared(nsec, nsec), payload, content, digest, xattrs or no_xattrs)
                children[name] = node
                if mode & _S_IFMT == _S_IFDIR:
                    found[join(path, name)] = node
        return [(path, found[path]) for path in left_paths]

    def count(self, entries: int) -> None:
        if self.progress is not None:
            self.progress.entries += entries

    def scan(self, dpath: bytes, dnode: Node, stack: list[tuple[bytes, Node]]) -> int:
        """Add the entries of directory ``dpath`` to ``dnode``; push subdirectories."""
        # the per-entry loop of the whole build: everything it uses is a local
        children = dnode.children
        assert children is not None
        options = self.options
        skip_devices = options.skip_devices
        use_epoch = options.use_epoch
        hardlinks = options.hardlinks
        read_xattrs = self.read_xattrs
        xattrs = self.xattrs
        no_xattrs = self.no_xattrs
        add = self.pool.add
        seen = self.seen
        links = self.links
        readlink = os.readlink
        listdir = os.listdir
        lstat = os.lstat
        modes = self.modes
        mtimes = self.mtimes
        cache = self.cache
        lookup = cache.lookup if cache is not None else None
        store = self.store
        count = 0
        try:
            # in name order, the image's: see ``walk`` (names and lstat, no DirEntry per
            # entry: ~10% of a bare walk)
            names = listdir(dpath)
            names.sort()
            prefix = dpath if dpath.endswith(b"/") else dpath + b"/"
            for name in names:
                path = prefix + name
                try:
                    st = lstat(path)
                except OSError as exc:
                    raise walk_error("error accessing", path, exc) from None
                mode = st.st_mode
                fmt = mode & _S_IFMT
                if skip_devices and (fmt == _S_IFCHR or fmt == _S_IFBLK):
                    continue
                count += 1
                if use_epoch:
                    sec = nsec = 0
                else:
                    mtime = st.st_mtime_ns
                    times = mtimes.get(mtime)
                    if times is None:
                        times = mtimes[mtime] = divmod(mtime, _NS)
                    sec, nsec = times
                size = st.st_size
                # a file the digest cache knows: its record may say it has no xattrs (then
                # none are asked for: see ``mkcfs.store.cache``)
                hit = (lookup(st) if lookup is not None and fmt == _S_IFREG and size > 0
                       and not (hardlinks and st.st_nlink > 1) else None)
                if hit is not None and hit[1]:
                    node_xattrs, seen_none = no_xattrs, True
                elif read_xattrs:
                    found = xattrs(path)
                    node_xattrs, seen_none = found or no_xattrs, found is None
                else:
                    node_xattrs, seen_none = no_xattrs, False
                # one int object per distinct mode and mtime (trees share few): less memory
                node = Node(modes.setdefault(mode, mode), 1, st.st_uid, st.st_gid,
                            st.st_rdev, size, sec, nsec, None, None, None, node_xattrs)
                children[name] = node
                if fmt == _S_IFREG:
                    if st.st_nlink > 1 and hardlinks:
                        links.setdefault((st.st_dev, st.st_ino), []).append(
                            (path, children, name, node))
                    elif size > 0:
                        if st.st_nlink > 1:
                            key = (st.st_dev, st.st_ino, size)
                            primary = seen.get(key)
                            if primary is not None:
                                self.pool.alias(node, primary)
                                continue
                            seen[key] = node
                        if lookup is not None:
                            if size > INLINE_MAX:
                                if hit is not None and (store is None or hit[0] in store):
                                    node.digest = digest = hit[0]
                                    node.payload = object_path(digest).encode()
                                    continue
                                if cache.cacheable(st):  # type: ignore[union-attr]
                                    cache.record_later(st, node,  # type: ignore[union-attr]
                                                       seen_none)
                                    previous = cache.previous(st)  # type: ignore[union-attr]
                                    if previous is not None:
                                        self.changed.append((dpath, name, *previous))
                            elif hit is None and cache.cacheable(st):  # type: ignore[union-attr]
                                # inline contents, read anyway: the record tells the next
                                # build whether the file changed since
                                previous = cache.previous(st)  # type: ignore[union-attr]
                                if previous is not None:
                                    self.changed.append((dpath, name, None, *previous[1:]))
                                cache.record_inline(st, seen_none)  # type: ignore[union-attr]
                        add(path, node)
                elif fmt == _S_IFDIR:
                    stack.append((path, node))
                else:
                    if fmt == _S_IFLNK:
                        try:
                            node.payload = readlink(path)
                        except OSError as exc:
                            raise walk_error("error accessing", path, exc) from None
                    if hardlinks and st.st_nlink > 1:
                        links.setdefault((st.st_dev, st.st_ino), []).append(
                            (path, children, name, node))
        except WalkError:
            raise
        except OSError as exc:   # opening or reading the directory
            raise walk_error("error accessing", dpath, exc) from None
        return count

    def tree_key(self, root: Node) -> bytes:
        """After a shared walk whose files all have their contents: the SHA-256 of the tree
        (see the module docstring) below ``root``, the same for the same tree whichever
        process scanned which directory."""
        self.dir_digests += [
            (path, _entries_digest(path, _directory_entries(node.children)))  # type: ignore[arg-type]
            for path, node in self.own_dirs]
        self.own_dirs = []
        self.dir_digests.sort()
        return self._key(root, self.dir_digests)

    def changed_files(self) -> list[ChangedFile]:
        """After ``run``: the files of ``changed``, grouped by directory (found once)."""
        if self._changed_files is not None:
            return self._changed_files
        assert self.source is not None
        src, root = self.source
        out = []
        directories: dict[bytes, tuple[list[bytes], dict]] = {}
        for dpath, name, previous, size, mtime in sorted(self.changed, key=itemgetter(0)):
            if dpath not in directories:
                parts = [part for part in dpath[len(src):].split(b"/") if part]
                node = root
                for part in parts:
                    node = node.children[part]  # type: ignore[index,assignment]
                directories[dpath] = (parts, node.children)  # type: ignore[assignment]
            parts, children = directories[dpath]
            out.append(ChangedFile(dpath, [*parts, name], children, children[name], previous,
                                   size, mtime))
        self._changed_files = out
        return out

    def previous_tree_key(self, old_content: OldContent) -> PreviousTree | None:
        """After ``tree_key``: what the tree was when the files that changed since the digest
        cache's records had their old contents (``PreviousTree``): a file larger than 64
        bytes the digest the cache recorded for its inode, a smaller one what
        ``old_content(names)`` gives for its path (one name per level below the root; None
        when it cannot tell, and then this is None too). None as well when no digest and no
        contents changed. The size and the mtime recorded are given back too (the mtime
        not with ``use_epoch``). When the key is the last image's, that image was made from
        this very tree but for those files' contents, sizes and mtimes (``mkcfs.build.reuse``)."""
        edits: list[tuple[bytes, bytes]] = []
        inline_edits: list[tuple[list[bytes], bytes]] = []
        inode_edits: list[InodeEdit] = []
        replaced: dict[bytes, bytes] = {}
        changed = self.changed_files()
        kept = [(file.node, file.node.digest, file.node.payload, file.node.content,
                 file.node.size, file.node.mtime_sec, file.node.mtime_nsec) for file in changed]
        use_epoch = self.options.use_epoch
        try:
            for i, (dpath, names, siblings, node, previous, size, mtime) in enumerate(changed):
                old_mtime = (node.mtime_sec, node.mtime_nsec) if use_epoch else divmod(mtime, _NS)
                if (size, old_mtime) != (node.size, (node.mtime_sec, node.mtime_nsec)):
                    inode_edits.append(InodeEdit(names, size, old_mtime, node.size,
                                                 (node.mtime_sec, node.mtime_nsec)))
                    node.size = size
                    node.mtime_sec, node.mtime_nsec = old_mtime
                if previous is None:   # inline contents
                    old = old_content(names)
                    if old is None:
                        return None
                    if old != node.content:
                        inline_edits.append((names, node.content))  # type: ignore[arg-type]
                    node.content = old
                else:
                    if node.digest != previous:
                        edits.append((previous, node.digest or b""))
                    node.digest = previous
                    node.payload = object_path(previous).encode()
                if i + 1 == len(changed) or changed[i + 1].directory != dpath:   # its last
                    replaced[dpath] = _entries_digest(dpath, _directory_entries(siblings))
        finally:
            for node, digest, payload, content, size, sec, nsec in kept:
                node.digest, node.payload, node.content = digest, payload, content
                node.size, node.mtime_sec, node.mtime_nsec = size, sec, nsec
        if not edits and not inline_edits and not inode_edits:
            return None
        assert self.source is not None
        return PreviousTree(self._key(self.source[1], [(path, replaced.get(path, digest))
                                                       for path, digest in self.dir_digests]),
                            edits, inline_edits, inode_edits)

    def _key(self, root: Node, digests: list[tuple[bytes, bytes]]) -> bytes:
        """The tree key of ``root`` with these ``(path, entries digest)``, sorted."""
        from hashlib import sha256

        options = self.options
        head = marshal.dumps((options.use_epoch, options.skip_devices, options.skip_xattrs,
                              options.user_xattrs, options.hardlinks),
                             _CANONICAL) + _directory_entries({b"": root})
        return sha256(b"".join([head, *(path + b"\0" + digest for path, digest in digests)])
                      ).digest()

    def resolve_links(self) -> None:
        """hardlinks mode: one node per inode (the first path in sorted depth-first order),
        the other paths become ``HardLink``s to it."""
        pool = self.pool
        for group in self.links.values():
            if len(group) > 1:
                group.sort(key=lambda item: item[0].split(b"/"))
            path, _, _, primary = group[0]
            primary.nlink = len(group)
            for _, children, name, _ in group[1:]:
                children[name] = HardLink(primary)
            if (primary.mode & _S_IFMT) == _S_IFREG and primary.size > 0:
                pool.add(path, primary)
        self.links.clear()


class _WorkerFiles:
    """What a worker's walk (``_walk_in_worker``) has in place of the ``DigestPool``: the files
    to read, read in the worker itself once its subtrees are walked."""

    failed = False

    def __init__(self) -> None:
        self.files: list[tuple[bytes, int]] = []
        self.nodes: list[Node] = []
        self.aliases: list[tuple[Node, Node]] = []

    def add(self, path: bytes, node: Node) -> None:
        self.files.append((path, node.size))
        self.nodes.append(node)

    def alias(self, node: Node, primary: Node) -> None:
        self.aliases.append((node, primary))

    def finish(self) -> None:
        for start in range(0, len(self.files), _WORKER_BATCH):
            fill_nodes(self.nodes[start:start + _WORKER_BATCH],
                       run_batch_in_worker(self.files[start:start + _WORKER_BATCH]))
        copy_results(self.aliases)


#: what a worker walking part of the tree shares with the build: its options and digest cache
#: (set in the building process before the pool forks its workers, which keep their copy)
_forked: tuple[WalkOptions, DigestCache | None] | None = None


def _walk_in_worker(paths: list[bytes]) -> bytes:
    """In a worker process: walk the directories ``paths`` as ``_Walker.walk`` does, read
    their new and small files, and return everything packed (``marshal``) for
    ``_Walker.graft``: the entry count; each directory walked, after its parent, as ``(path,
    entries, digest)`` (``_pack``); the paths of the directories found and left for another
    job; the digest cache's updates; the files missing from the cache that it had a record
    of (``_Walker.changed``). It stops taking directories from its stack after
    ``_JOB_ENTRIES`` entries (the directories it was given are always read)."""
    assert _forked is not None
    options, cache = _forked
    files = _WorkerFiles()
    walker = _Walker(options, files, None, cache, store_in_worker())   # type: ignore[arg-type]
    tops = [Node(_S_IFDIR) for _ in paths]
    stack: list[tuple[bytes, Node]] = []
    count = 0
    for path, top in zip(paths, tops):
        count += walker.scan(path, top, stack)
    while stack and count < _JOB_ENTRIES:
        if cancelled_in_worker():
            raise Cancelled("cancelled")
        dpath, dnode = stack.pop()
        count += walker.scan(dpath, dnode, stack)
    left = {id(node): path for path, node in stack}   # for another job
    files.finish()
    updates = None
    if cache is not None:
        cache.collect()
        updates = cache.take_updates()
    return marshal.dumps((count, _pack(list(zip(paths, tops)), left), list(left.values()),
                          updates, walker.changed))


def _pack(tops: list[tuple[bytes, Node]], left: dict[int, bytes]) -> list[tuple[bytes, bytes,
                                                                                 bytes]]:
    """The directories walked below the ``tops`` ``(path, node)``, each after its parent, as
    ``(path, entries, digest)``: ``_directory_entries`` and ``_entries_digest``; a directory
    in ``left`` (``id`` -> path) is not walked yet and has none."""
    out: list[tuple[bytes, bytes, bytes]] = []
    add = out.append
    pending = list(tops)
    join = os.path.join
    while pending:
        path, node = pending.pop()
        children = node.children
        assert children is not None
        for name, child in children.items():
            if child.children is not None and id(child) not in left:  # type: ignore[union-attr]
                pending.append((join(path, name), child))  # type: ignore[arg-type]
        entries = _directory_entries(children)
        add((path, entries, _entries_digest(path, entries)))
    return out


#: marshal's version 2 writes no back-references: the same values give the same bytes, whatever
#: objects they are (version 3 and later mark objects seen twice)
_CANONICAL = 2


def _directory_entries(children: dict) -> bytes:
    """What the image takes from the entries of a directory, packed (``marshal``, canonical):
    per entry in name order its name and the node's fields but its children. A worker sends
    this, and it is what ``_entries_digest`` hashes."""
    return marshal.dumps([(name, node.mode, node.uid, node.gid, node.rdev, node.size,
                           node.mtime_sec, node.mtime_nsec, node.payload, node.content,
                           node.digest, node.xattrs or None)
                          for name, node in children.items()], _CANONICAL)


def _entries_digest(path: bytes, entries: bytes) -> bytes:
    """The SHA-256 of the directory at ``path`` with these ``_directory_entries``."""
    from hashlib import sha256

    return sha256(path + b"\0" + entries).digest()


def walk_directory(path: PathArg, options: WalkOptions | None = None) -> Node:
    """Read the directory tree at ``path`` into a ``Node`` tree (see the module docstring)."""
    walk = start_walk(path, options)
    walk.wait()
    return walk.root


#: what ``WalkInProgress.wait`` calls with nodes that have just been filled
Filled = Callable[[list[Node]], object]


class WalkInProgress:
    """A directory walked whose files are still being read (``start_walk``): ``root`` has every
    entry, but the regular files larger than 0 bytes get their ``content``, ``digest`` and
    ``payload`` only in ``wait()``. Until then the caller may read everything else of the tree
    (what does not depend on file contents), and must call ``wait()`` or ``abort()``."""

    def __init__(self, root: Node, finish: Callable[[Filled | None, bool], None],
                 abort: Callable[[], None], cache: DigestCache | None = None,
                 shared: bool = False, hard_links: bool = True) -> None:
        self.root = root
        #: whether the workers walked parts of the tree (a rebuild that expects to find its
        #: files in the digest cache): only such a walk gives a ``tree_key``
        self.shared = shared
        #: whether the tree may hold ``HardLink`` entries (only a walk with ``hardlinks``)
        self.hard_links = hard_links
        self._finish: Callable[[Filled | None, bool], None] | None = finish
        self._abort = abort
        #: the digest cache this walk uses (``--digest-cache``), or None
        self.cache = cache
        #: after ``wait(for_reuse=True)`` of a walk shared with the workers (a rebuild that
        #: expected to find its files in the cache): the SHA-256 of the tree as walked (see
        #: the module docstring); None otherwise
        self.tree_key: bytes | None = None
        #: after ``wait(for_reuse=True)`` of a shared walk: its walker, which knows what
        #: changed since the digest cache's records
        self._walker: _Walker | None = None

    @property
    def changes(self) -> int:
        """After ``wait(for_reuse=True)`` of a shared walk: how many files changed since the
        digest cache recorded them (read again; ``previous_tree`` looks at them)."""
        return len(self._walker.changed) if self._walker is not None else 0

    def digest_edits(self) -> list[tuple[bytes, bytes]]:
        """After ``wait(for_reuse=True)`` of a shared walk: ``(recorded, now)`` digests of the
        files larger than 64 bytes whose digest changed since the digest cache recorded it."""
        if self._walker is None:
            return []
        # (a file without a digest, which a finished walk does not leave, gets b"": no
        # image has it, and the rewrite is refused)
        return [(file.previous, file.node.digest or b"")
                for file in self._walker.changed_files()
                if file.previous is not None and file.node.digest != file.previous]

    def previous_tree(self, old_content: OldContent) -> PreviousTree | None:
        """After ``wait(for_reuse=True)`` of a shared walk: the tree as it was before the
        files that changed since the digest cache's records did (see
        ``_Walker.previous_tree_key``), or None."""
        if self._walker is None:
            return None
        return self._walker.previous_tree_key(old_content)

    def wait(self, filled: Filled | None = None, *, for_reuse: bool = False) -> None:
        """Wait for the files to be read and fill their nodes; raise the walk's error (a file
        that could not be read, a store that could not be written) if there was one.
        ``filled(nodes)`` is called with each group of nodes as soon as they are filled (not
        necessarily with every node: look at the others after ``wait()``). The digest cache
        is written then, except with ``for_reuse``: then ``tree_key`` is set too (the tree
        must be whole: not flattened yet), and the caller calls ``cache.save()`` (after
        ``cache.remember_image``, say)."""
        finish, self._finish = self._finish, None
        if finish is not None:
            finish(filled, for_reuse)

    def abort(self) -> None:
        """Stop reading files (the build failed elsewhere): nothing is left running, and the
        store gets no half-written object."""
        if self._finish is not None:
            self._finish = None
            self._abort()


def start_walk(path: PathArg, options: WalkOptions | None = None) -> WalkInProgress:
    """Walk the directory tree at ``path`` (see the module docstring) and return while its
    files are still being read, so that the caller can work on the tree meanwhile (a store
    inside the source tree, filled after the walk, is filled before it returns)."""
    if options is None:
        options = WalkOptions()
    if options.skip_xattrs and options.user_xattrs:
        raise BuildInputError("--user-xattrs and --skip-xattrs cannot be used together")
    threads = options.threads if options.threads is not None else _default_threads()
    if threads < 1:
        raise BuildInputError(f"Invalid threads count {threads}")
    src = os.fsencode(path)
    try:
        st = os.lstat(src)
    except OSError as exc:
        raise walk_error("error accessing", src, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise walk_error("error accessing", src, os.strerror(errno.ENOTDIR))

    store = store_after_walk = None
    if options.digest_store is not None:
        from mkcfs.store.objects import ObjectStore
        store = ObjectStore(options.digest_store)
        if _inside(store.root, src):
            store, store_after_walk = None, store
    cache = None
    if options.digest_cache is not None:
        from mkcfs.store.cache import DigestCache
        cache = DigestCache(os.fsencode(options.digest_cache), src, st)

    # the pool forks its workers: before the progress thread exists, and while we are small;
    # they get their copy of the options and cache in case they walk part of the tree
    global _forked
    _forked = (options, cache)
    try:
        pool = DigestPool(threads, store)
    finally:
        _forked = None
    # workers walk with this process where the walk is the work: a rebuild that expects to
    # find its files in the cache (and in the store, which then exists already: it is not
    # created earlier than a walk done here alone would create it)
    # (with one worker, that worker would walk alone while this process waits: slower)
    shared = (pool.processes and threads > 1 and cache is not None and cache.expects_hits
              and (store is None or os.path.isdir(store.root))
              and store_after_walk is None and not options.hardlinks)
    progress = pool.progress = Progress.for_stream(enabled=options.progress)

    def close() -> None:
        if progress is not None:
            progress.close()
        if store is not None:
            store.close()   # its store lock; a caller that writes an image holds its own

    def abort() -> None:
        try:
            pool.abort()
        finally:
            close()
            if store_after_walk is not None:
                store_after_walk.close()

    def finish(filled: Filled | None, for_reuse: bool) -> None:
        try:
            pool.finish(filled)
            if for_reuse and shared:
                walk.tree_key = walker.tree_key(root)
                walk._walker = walker
            if cache is not None:
                cache.collect()
                if not for_reuse:
                    cache.save()
                else:
                    cache.end_lookups()
        except BaseException:
            pool.abort()
            if store_after_walk is not None:
                store_after_walk.close()
            raise
        finally:
            close()
        if store_after_walk is not None:
            try:
                _fill_store_after_walk(src, root, store_after_walk, threads)
            finally:
                store_after_walk.close()

    try:
        if shared:
            pool.prepare_store()   # the workers store the new files they find
        walker = _Walker(options, pool, progress, cache, store)
        root = walker.run(src, st, shared)
    except BaseException:
        abort()
        raise
    walk = WalkInProgress(root, finish, abort, cache, shared, options.hardlinks)
    if store_after_walk is not None:
        walk.wait()   # it reads the whole tree again: before anyone takes it apart
    return walk


def _inside(path: bytes, directory: bytes) -> bool:
    """Whether ``path`` (existing or not) is ``directory`` or below it, symlinks resolved."""
    real = os.path.realpath(path)
    top = os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip(b"/") + b"/")


def _fill_store_after_walk(src: bytes, root: Node, store: ObjectStore, threads: int) -> None:
    """Store the tree's files in a store that lies inside the source tree, after the walk, as
    mkcomposefs 1.0.8 does: the walk saw the tree as it was before the build (no store
    directory if there was none, no objects this build adds), so the image is 1.0.8's. Each
    file is read again; one that changed since the walk hashed it is refused."""
    store.prepare_root()   # created (and locked: mkcfs.store.lock) here, not in a worker
    pool = DigestPool(threads, store)
    checks: list[tuple[bytes, Node, Node]] = []
    try:
        for path, entry in iter_tree(root):
            if isinstance(entry, Node) and entry.digest is not None:
                again = Node(entry.mode, size=entry.size)
                full = src.rstrip(b"/") + path
                pool.add(full, again)
                checks.append((full, entry, again))
        pool.finish()
    except BaseException:
        pool.abort()
        raise
    for full, entry, again in checks:
        if again.digest != entry.digest:
            raise file_changed(full)
