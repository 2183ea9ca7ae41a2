"""``mkcomposefs``: build a composefs image from a directory, a dumpfile (drop-in for 1.0.8) or
a container image (OCI layout, oci-archive, docker-archive, layer tar files).

Usage::

    mkcomposefs [OPTIONS] SOURCE IMAGE
    mkcomposefs --print-digest-only [OPTIONS] SOURCE
    mkcomposefs [OPTIONS] --layer=FILE [--layer=FILE...] IMAGE

Exit status 0 on success and 1 on any error, with one line ``mkcomposefs: <message>`` on stderr.
The image is written to a temporary file beside IMAGE and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn
from collections.abc import Callable, Sequence

from mkcfs.cli import common

PROG = "mkcomposefs"

USAGE = """\
usage: mkcomposefs [OPTIONS] SOURCE IMAGE
       mkcomposefs --print-digest-only [OPTIONS] SOURCE
       mkcomposefs [OPTIONS] --layer=FILE [--layer=FILE...] IMAGE

Build a composefs image (EROFS metadata + overlay xattrs) from SOURCE, a directory, or with
--from-file a composefs-dump(5) file ('-' reads standard input). IMAGE '-' writes to stdout.

SOURCE may also be a container image, read in one pass without extracting it:
  oci:DIR[:REF]              OCI image layout (REF: org.opencontainers.image.ref.name)
  oci-archive:FILE[:REF]     the same as a tar file
  docker-archive:FILE[:REF]  'docker save' output (REF: NAME:TAG, or @N)
  tar:FILE                   one layer tar (gzip, zstd or plain; '-' is standard input)
--layer=FILE, repeated, applies several layer tars in order (then no SOURCE is given).
A PATH holding ':' is taken whole when it exists; otherwise the last ':' starts REF.

options:
  --digest-store=PATH   copy files larger than 64 bytes into the object store PATH
  --digest-cache=PATH   remember file digests in PATH and do not read again the files
                        whose inode, size, mtime and ctime are unchanged, and keep
                        IMAGE as it is when it holds the image of the unchanged tree
                        (directory source; default: PATH/.mkcfs-digest-cache of
                        --digest-store, unless the store lies inside SOURCE)
  --no-digest-cache     use no digest cache
  --use-epoch           set every mtime to 0 (directory or image source)
  --skip-devices        leave out character and block devices (directory or image)
  --skip-xattrs         read no xattrs from the source (directory or image)
  --user-xattrs         read only user.* xattrs from the source (directory or image)
  --hardlinks           keep hard links as hard links in the image (directory source;
                        mkcomposefs 1.0.8 stores every link as a separate inode; image
                        sources always keep them)
  --print-digest        print the image's fs-verity digest after writing it
  --print-digest-only   print the digest only, write no image (no IMAGE argument)
  --from-file           SOURCE is a dumpfile
  --min-version=N       lowest format version to write (0 or 1; default 0)
  --max-version=N       highest format version to write (0 or 1; default 1)
  --threads=N           parallel workers for digests and store copies (default: the
                        CPUs this process may use; images: 1 = no decompression thread)
  --platform=OS/ARCH[/VARIANT]
                        image source: the platform to take from a multi-platform image
                        (default: this machine's)
  --layer=FILE          a layer tar to apply (repeat in order; '-' is standard input)
  --stats[=json]        print a build summary on stderr (entries by type, inline and
                        external files, distinct and new objects, bytes deduplicated,
                        image size, time); =json: the same as one JSON object
  --help                show this help
"""

OPTIONS: dict[str, bool | None] = {
    # name: takes a value (None: an optional one, --name=value)
    "digest-store": True, "digest-cache": True, "no-digest-cache": False, "use-epoch": False,
    "skip-devices": False, "skip-xattrs": False,
    "user-xattrs": False, "hardlinks": False, "print-digest": False, "print-digest-only": False,
    "from-file": False, "min-version": True, "max-version": True, "threads": True, "help": False,
    "platform": True, "layer": True, "stats": None,
}


def _fail(message: str, usage: bool = False) -> NoReturn:
    raise common.UsageError(message, usage)


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        _fail(f"Invalid {what} {text}")


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(PROG, USAGE, _main, argv)


def _main(argv: list[str]) -> int:
    layers: list[str] = []
    opts, args = common.parse_long_options(argv, OPTIONS, {"layer": layers})
    if "help" in opts:
        sys.stdout.write(USAGE)
        return 0
    from_file = "from-file" in opts
    digest_only = "print-digest-only" in opts
    print_digest = "print-digest" in opts or digest_only
    min_given, max_given = "min-version" in opts, "max-version" in opts
    min_version = _parse_int(opts["min-version"], "min version") if min_given else 0
    max_version = _parse_int(opts["max-version"], "max version") if max_given else (
        0 if min_given else 1)
    threads = None
    if "threads" in opts:
        threads = _parse_int(opts["threads"], "threads count")
        if threads <= 0:
            _fail(f"Invalid threads count {opts['threads']}")
    if "user-xattrs" in opts and "skip-xattrs" in opts:
        _fail("--user-xattrs and --skip-xattrs cannot be used together")
    stats = None
    if "stats" in opts:
        if opts["stats"] not in ("", "json"):
            _fail(f"Invalid --stats format '{opts['stats']}' (--stats or --stats=json)")
        from mkcfs.build.stats import BuildStats
        stats = BuildStats()

    if layers:
        if from_file:
            _fail("--layer and --from-file cannot be used together")
        args.insert(0, "tar:")
    if not args:
        _fail("No source path specified", usage=True)
    source = args[0]
    if not source:
        _fail("Empty source path specified", usage=True)
    if len(args) > 2:
        _fail("Too many arguments", usage=True)
    image_path = args[1] if len(args) == 2 else None
    if digest_only and image_path is not None:
        _fail("Cannot specify destination path with --print-digest-only", usage=True)
    if not digest_only and image_path is None:
        _fail("No destination path specified", usage=True)
    if image_path == "-" and os.isatty(sys.stdout.fileno()):
        _fail("stdout is a tty.  Refusing to use it")
    if image_path not in (None, "-"):
        common.check_output_dir(image_path)

    image_source = None
    if not from_file:
        from mkcfs.sources.transport import ImageSource, is_image_source, parse_source
        if layers:
            image_source = ImageSource("tar", "", None, tuple(layers))
        elif is_image_source(source):
            image_source = parse_source(source)
    if "platform" in opts and image_source is None:
        _fail("--platform needs an image source (oci:, oci-archive:, docker-archive:)")

    def load_tree():
        if image_source is not None:
            from mkcfs.sources.oci import OciOptions, load_image_tree
            return load_image_tree(image_source, OciOptions(
                platform=opts.get("platform"), use_epoch="use-epoch" in opts,
                skip_devices="skip-devices" in opts, skip_xattrs="skip-xattrs" in opts,
                user_xattrs="user-xattrs" in opts, digest_store=opts.get("digest-store"),
                threads=threads)).root
        if from_file:
            from mkcfs.sources.dumpfile import parse_dumpfile
            stream = common.open_input(source)
            try:
                return parse_dumpfile(stream, strict="CFS_PARSE_STRICT" in os.environ,
                                      source="<stdin>" if source == "-" else source,
                                      share_xattrs=True)   # only build_image_from sees it
            except OSError as exc:
                raise common.read_error(source, exc) from None
            finally:
                if source != "-":
                    stream.close()
        from mkcfs.sources.walk import WalkOptions, start_walk
        store = opts.get("digest-store")
        cache = opts.get("digest-cache")
        if "no-digest-cache" in opts:
            cache = None
        elif cache is None and store is not None:
            from mkcfs.store.cache import default_cache_path
            cache = default_cache_path(store, source)
        # the image is flattened while the files are still being read
        walk = start_walk(source, WalkOptions(
            use_epoch="use-epoch" in opts, skip_devices="skip-devices" in opts,
            skip_xattrs="skip-xattrs" in opts, user_xattrs="user-xattrs" in opts,
            hardlinks="hardlinks" in opts, threads=threads,
            digest_store=store, digest_cache=cache or None,
            share_xattrs=True))   # only build_image_from sees the tree
        if stats is None:
            return walk
        walk.wait()   # --stats counts the files' contents before the tree is flattened
        return walk.root

    from mkcfs.build.image import build_image_from
    from mkcfs.fsutil import write_atomically
    # a build into a store holds the store lock until its image is in place (mkcfs.store.lock)
    stores = "digest-store" in opts and not from_file
    held = _hold_store(opts["digest-store"]) if stores else None
    digest = None
    saved = False   # the digest cache (a rebuild's), once saved with the image it remembers
    try:
        walk = key = patched = None
        if (image_source is None and not from_file and stats is None and image_path != "-"):
            walk = load_tree()
            if walk.shared:   # a rebuild: it may be that of the last image (mkcfs.build.reuse)
                walk.wait(for_reuse=True)
                from mkcfs.build.reuse import image_key, kept_image, patched_image
                assert walk.tree_key is not None and walk.cache is not None
                key = image_key(walk.tree_key, min_version, max_version)
                digest = kept_image(walk.cache, key, image_path)
                if digest is None:   # perhaps only some files' contents changed
                    patched = patched_image(walk, min_version, max_version, image_path)
        try:
            if digest is None:
                image = build_image_from(
                    (load_tree if walk is None else lambda: walk) if stats is None
                    else _counted(load_tree, stats),
                    min_version=min_version, max_version=max_version,
                    dispose=common.keep_to_exit) if patched is None else patched
                # the digest, when needed, is hashed while the image is written (both let go
                # of the GIL: ~20 ms of a /usr rebuild), and then a rebuild's digest cache is
                # saved, remembering it (~25 ms). Should the write fail, the next build finds
                # that the image file does not have that digest (mkcfs.build.reuse).

                def remember(image_digest: bytes) -> None:
                    nonlocal saved
                    walk.cache.remember_image(key, image_digest)  # type: ignore[union-attr]
                    walk.cache.save()  # type: ignore[union-attr]
                    saved = True
                digest_of = (_digest_meanwhile(image, remember if key is not None else None)
                             if key is not None or print_digest else None)
                try:
                    if image_path == "-":
                        common.write_stdout(image.data)
                    elif image_path is not None:
                        try:
                            write_atomically(image_path, image.data)
                        except OSError as exc:
                            _fail(f"cannot write {image_path}: {exc.strerror or exc}")
                finally:
                    if digest_of is not None:
                        digest = digest_of()
        finally:
            if key is not None and not saved:
                walk.cache.save()  # type: ignore[union-attr]
    finally:
        if held is not None:
            held.close()
    if stats is not None:
        if stores:
            stats.count_store(opts["digest-store"])
        stats.finish(len(image.data), image.version)
        _print_stats(stats, opts["stats"] == "json")
    if print_digest:
        if digest is None:
            digest = image.fsverity_digest()
        common.write_stdout((digest.hex() + "\n").encode())
    return 0


def _digest_meanwhile(image, then: Callable[[bytes], None] | None = None
                      ) -> Callable[[], bytes]:
    """Start hashing ``image`` (its fs-verity digest) in a thread, which then calls
    ``then(digest)`` if given; the returned function waits for both, and raises what ``then``
    raised."""
    import threading

    result: list[bytes] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            result.append(image.fsverity_digest())
            if then is not None:
                then(result[0])
        except BaseException as exc:   # noqa: BLE001 (raised again in the caller's thread)
            failed.append(exc)

    thread = threading.Thread(target=work, name="image digest")
    thread.start()

    def wait() -> bytes:
        thread.join()
        if failed:
            raise failed[0]
        if not result:   # pragma: no cover - hashing in memory does not fail
            raise RuntimeError("the image digest could not be computed")
        return result[0]
    return wait


def _counted(load_tree, stats):
    """``load_tree`` that also counts the tree into ``stats`` before it is flattened."""
    def load_and_count():
        tree = load_tree()
        stats.count_tree(tree)
        return tree
    return load_and_count


def _print_stats(stats, as_json: bool) -> None:
    """The build summary goes to stderr: stdout carries the image (``-``) and the digest."""
    if as_json:
        import json
        sys.stderr.write(json.dumps(stats.as_dict(), separators=(",", ":")) + "\n")
    else:
        sys.stderr.write("".join(f"{PROG}: {line}\n" for line in stats.lines()))
    sys.stderr.flush()


def _hold_store(path: str) -> contextlib.ExitStack:
    """The shared lock of the object store ``path`` for the whole build: taken now when the
    store exists, else kept from when the build creates it (at its first object) on."""
    from mkcfs.store import lock as store_lock

    held = contextlib.ExitStack()
    held.enter_context(store_lock.retain_shared(path))
    return held


def console() -> NoReturn:
    """The installed command (and ``python -m``): ``main()``, then a fast exit on success."""
    common.console(PROG, main)


if __name__ == "__main__":  # pragma: no cover
    console()
