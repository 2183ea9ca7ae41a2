"""Readers that turn a layer blob into a checked, decompressed byte stream, in one pass.

The chain for one layer is::

    raw file -> VerifiedBlob (size + digest of the blob as stored)
             -> gzip / zstd decompressor (or nothing)
             -> Prefetch (optional: the chain above runs in a helper thread)
             -> CheckedStream (sha256 of the uncompressed layer = diff_id; bomb limit)

Every reader has ``read(n)`` returning at most ``n`` bytes (``Prefetch``: one chunk of at
most ``CHUNK``), ``b""`` at the end, so memory stays bounded whatever the blob holds.
Errors are ``LayerError`` with one line naming the blob.

**Decompression-bomb limit.** A layer may decompress to at most ``RATIO_LIMIT`` (1100) times
its compressed size plus ``SLACK`` (1 GiB), checked as the data streams. gzip cannot exceed
about 1032:1, so only crafted zstd (or concatenated gzip) streams meet the limit; a layer that
really holds more (e.g. a huge file of zeros compressed with zstd) needs ``ratio_limit`` raised
in the API (``OciOptions.ratio_limit``).

**Decompressors** (measured, see README "Dependencies"): gzip through ``isal.isal_zlib`` when
installed, else ``zlib``; zstd through ``zstandard`` (a zstd layer without it fails with one
line saying so).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mkcfs.errors import BuildInputError

__all__ = ["LayerError", "VerifiedBlob", "CheckedStream", "Prefetch", "decompressor",
           "sniff_compression", "RATIO_LIMIT", "SLACK", "CHUNK"]

CHUNK = 1 << 20
RATIO_LIMIT = 1100
SLACK = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class LayerError(BuildInputError):
    """A blob or layer that cannot be used; the message names it."""


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def sniff_compression(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (plain tar) from the first bytes of a layer."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


class VerifiedBlob:
    """Reads a blob and checks, as it ends, that it had ``size`` bytes (None: any) and the
    ``digest`` (``"sha256:<hex>"``, None: not checked). ``consumed`` counts bytes read."""

    def __init__(self, raw: Readable, name: str, size: int | None, digest: str | None) -> None:
        self._raw = raw.read
        self.name = name
        self._size = size
        self._digest = digest
        self._hash = None
        if digest is not None:
            algorithm, _, self._hex = digest.partition(":")
            try:
                self._hash = hashlib.new(algorithm)
            except ValueError:
                raise LayerError(f"{name}: unsupported digest algorithm {algorithm!r}") from None
        self.consumed = 0
        self.done = False

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        data = self._raw(n)
        if data:
            self.consumed += len(data)
            if self._size is not None and self.consumed > self._size:
                raise LayerError(f"{self.name}: larger than the {self._size} bytes its "
                                 f"descriptor says")
            if self._hash is not None:
                self._hash.update(data)
            return data
        self.done = True
        if self._size is not None and self.consumed != self._size:
            raise LayerError(f"{self.name}: truncated ({self.consumed} of {self._size} bytes)")
        if self._hash is not None and self._hash.hexdigest() != self._hex:
            raise LayerError(f"{self.name}: digest mismatch (the blob's sha256 is "
                             f"{self._hash.hexdigest()})")
        return b""

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _GzipReader:
    """gzip members (one or more, concatenated) with bounded output per read; trailing zero
    padding is accepted, anything else after the last member is an error."""

    def __init__(self, raw: Readable, name: str, zlib_module) -> None:
        self._raw = raw.read
        self.name = name
        self._zlib = zlib_module
        self._d = zlib_module.decompressobj(31)
        self._pending = b""
        self._in_member = False
        self._eof = False

    def read(self, n: int) -> bytes:
        zlib = self._zlib
        while not self._eof:
            d = self._d
            data = d.unconsumed_tail or self._pending
            self._pending = b""
            if not data:
                data = self._raw(CHUNK)
                if not data:
                    if self._in_member:
                        raise LayerError(f"{self.name}: truncated gzip data")
                    self._eof = True
                    break
            try:
                out = d.decompress(data, n)
            except zlib.error as exc:
                raise LayerError(f"{self.name}: corrupt gzip data ({exc})") from None
            self._in_member = not d.eof
            if d.eof:
                rest = d.unused_data
                self._d = zlib.decompressobj(31)
                if rest:
                    if rest.startswith(_GZIP_MAGIC[:len(rest)]):
                        self._pending = rest
                    else:
                        self._trailing(rest)
            if out:
                return out
        return b""

    def _trailing(self, rest: bytes) -> None:
        while rest:
            if rest.strip(b"\0"):
                raise LayerError(f"{self.name}: data after the end of the gzip stream")
            rest = self._raw(CHUNK)
        self._eof = True


class _ZstdFrames:
    """Passes the compressed bytes through while following the zstd frame structure (frame
    header, block headers, checksum, skippable frames), so that a stream cut at any point is
    reported: the ``zstandard`` stream reader ends silently on a truncated frame."""

    def __init__(self, raw: Readable, name: str) -> None:
        self._raw = raw.read
        self.name = name
        self._skip = 0
        self._header = bytearray()
        self._state = "magic"
        self._need = 4
        self._checksum = False
        self._frames = 0

    def read(self, n: int) -> bytes:
        data = self._raw(n)
        if data:
            self._feed(memoryview(data))
        elif self._state != "magic" or self._header or self._skip:
            raise LayerError(f"{self.name}: truncated zstd data")
        return data

    def _feed(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            take = min(self._need - len(self._header), end - pos)
            self._header += view[pos:pos + take]
            pos += take
            if len(self._header) == self._need:
                self._advance(bytes(self._header))
                self._header.clear()

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(header, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "frame", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            elif self._frames and not header.strip(b"\0"):
                pass      # zero padding after the last frame
            else:
                raise LayerError(f"{self.name}: data after the end of the zstd stream"
                                 if self._frames else f"{self.name}: not zstd data")
        elif state == "skippable":
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = "magic", 4
        elif state == "frame":
            fhd = header[0]
            single = (fhd >> 5) & 1
            if fhd & 0x08:
                raise LayerError(f"{self.name}: corrupt zstd data (reserved bit set)")
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            self._state, self._need = "block", 3
        else:   # block header
            value = int.from_bytes(header, "little")
            kind, size = (value >> 1) & 3, value >> 3
            if kind == 3:
                raise LayerError(f"{self.name}: corrupt zstd data (reserved block type)")
            self._skip = 1 if kind == 1 else size
            if value & 1:      # the frame's last block
                self._skip += 4 if self._checksum else 0
                self._frames += 1
                self._state, self._need = "magic", 4


class _ZstdReader:
    def __init__(self, raw: Readable, name: str) -> None:
        try:
            import zstandard
        except ImportError:
            raise LayerError(f"{name}: zstd layer, but the Python package 'zstandard' is not "
                             f"installed") from None
        self.name = name
        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _ZstdFrames(raw, name), read_size=CHUNK, read_across_frames=True)  # type: ignore[arg-type]

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except self._error as exc:
            raise LayerError(f"{self.name}: corrupt zstd data ({exc})") from None


def _zlib_module():
    try:
        from isal import isal_zlib
        return isal_zlib
    except ImportError:
        import zlib
        return zlib


def decompressor(raw: Readable, compression: str | None, name: str) -> Readable:
    """A reader of ``raw`` decompressed (``"gzip"``, ``"zstd"``, or None for plain)."""
    if compression is None:
        return raw
    if compression == "gzip":
        return _GzipReader(raw, name, _zlib_module())
    if compression == "zstd":
        return _ZstdReader(raw, name)
    raise LayerError(f"{name}: unknown compression {compression}")


class CheckedStream:
    """The uncompressed layer: checks its sha256 against ``diff_id`` at the end (None: not
    checked) and stops a decompression bomb (see the module docstring). ``blob`` is the
    compressed reader whose ``consumed`` count bounds the output."""

    def __init__(self, inner: Readable, name: str, diff_id: str | None,
                 blob: VerifiedBlob | None, ratio_limit: int = RATIO_LIMIT) -> None:
        self._read = inner.read
        self.name = name
        self._diff_id = diff_id
        self._hash = hashlib.sha256() if diff_id is not None else None
        self._blob = blob
        self._ratio = ratio_limit
        self.produced = 0
        self._ended = False

    def read(self, n: int) -> bytes:
        data = self._read(n)
        if data:
            self.produced += len(data)
            blob = self._blob
            if blob is not None and self.produced > SLACK + self._ratio * blob.consumed:
                raise LayerError(f"{self.name}: decompresses to more than {self._ratio} times "
                                 f"its size (a decompression bomb?)")
            if self._hash is not None:
                self._hash.update(data)
            return data
        if not self._ended:
            self._ended = True
            if self._blob is not None:
                self._blob.drain()
            if self._hash is not None:
                got = "sha256:" + self._hash.hexdigest()
                if got != self._diff_id:
                    raise LayerError(f"{self.name}: uncompressed content does not match the "
                                     f"config's diff_id {self._diff_id} (it is {got})")
        return b""


class Prefetch:
    """Runs ``source.read`` in a thread, ``depth`` chunks ahead (the decompressors and hashlib
    release the GIL, so this overlaps decompression with the caller's tar parsing and
    hashing). ``close()`` stops the thread; errors reach the caller on its next read."""

    def __init__(self, source: Readable, depth: int = 2) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source.read,),
                                         name="mkcfs-layer", daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[int], bytes]) -> None:
        put = self._queue.put
        try:
            while not self._stop.is_set():
                data = read(CHUNK)
                put(data)
                if not data:
                    return
        except BaseException as exc:   # handed to the reader
            put(exc)

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self) -> None:
        """Stop the thread: it ends after its current read. A read that does not return (a
        pipe nobody closes) is given up on after a few seconds; the thread is a daemon."""
        self._stop.set()
        deadline = time.monotonic() + 5.0
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.05)   # unblocks a put() on a full queue
            except queue.Empty:
                pass
