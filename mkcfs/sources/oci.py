"""OCI and Docker images as a build source: find the image, stream its layers, merge them.

``load_image_tree(source, options)`` returns an ``ImageTree``: the merged ``Node`` tree of the
image's layers (``mkcfs.sources.layers``) and the manifest digest. Sources
(``mkcfs.sources.transport``):

* ``oci:DIR[:REF]`` -- ``DIR/oci-layout``, ``DIR/index.json``, ``DIR/blobs/ALG/HEX``;
* ``oci-archive:FILE[:REF]`` -- the same inside a tar (indexed once, blobs read in place);
* ``docker-archive:FILE[:REF]`` -- ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``);
  its "manifest digest" is the image ID (the config's digest), as docker names images;
* ``tar:FILE`` / several layer files -- applied in order, compression found by magic; the
  digest is None.

Selecting the image: REF matches ``org.opencontainers.image.ref.name`` (docker: a RepoTag, or
``@N``). Without REF the only image is taken; several are an error listing them. An image
index (multi-platform) yields the manifest for this machine's platform, or ``platform``
(``OS/ARCH[/VARIANT]``).

Checks while streaming (one pass, nothing extracted): each blob's size and digest against its
descriptor, each uncompressed layer against the config's ``rootfs.diff_ids``, a decompression
bomb limit (``mkcfs.sources.layerstream``). JSON documents are read whole (at most
``JSON_MAX``). Errors: ``LayerError``/``TarError``, one line naming the blob or member.

File data: a regular file of 1..64 bytes is inlined; a larger one streams into the fs-verity
hasher and, with ``digest_store``, into the object store (``ObjectStore.add_stream``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

from fsverity import FsVerityHasher, digest_bytes, object_path

from mkcfs.errors import BuildInputError
from mkcfs.sources.layers import LayerMerger, MergeOptions
from mkcfs.sources.layerstream import (RATIO_LIMIT, CheckedStream, LayerError, Prefetch,
                                       VerifiedBlob, decompressor, sniff_compression)
from mkcfs.sources.tarlayer import TarReader
from mkcfs.sources.transport import ImageSource, parse_source
from mkcfs.store.reading import BUFFER_SIZE, INLINE_MAX
from mkcfs.tree import Node

__all__ = ["ImageTree", "OciOptions", "load_image_tree", "build_oci_image", "image_digest",
           "LAYER_MEDIA_TYPES", "host_platform", "LayerError"]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: largest JSON document (index, manifest, config) read
JSON_MAX = 16 << 20
REF_ANNOTATION = "org.opencontainers.image.ref.name"

_OCI = "application/vnd.oci.image."
_DOCKER = "application/vnd.docker."
#: layer media types -> compression
LAYER_MEDIA_TYPES: dict[str, str | None] = {
    _OCI + "layer.v1.tar": None,
    _OCI + "layer.v1.tar+gzip": "gzip",
    _OCI + "layer.v1.tar+zstd": "zstd",
    _OCI + "layer.nondistributable.v1.tar": None,
    _OCI + "layer.nondistributable.v1.tar+gzip": "gzip",
    _OCI + "layer.nondistributable.v1.tar+zstd": "zstd",
    _DOCKER + "image.rootfs.diff.tar.gzip": "gzip",
    _DOCKER + "image.rootfs.foreign.diff.tar.gzip": "gzip",
}
MANIFEST_TYPES = (_OCI + "manifest.v1+json", _DOCKER + "distribution.manifest.v2+json")
INDEX_TYPES = (_OCI + "index.v1+json", _DOCKER + "distribution.manifest.list.v2+json")
_SNIFF = "sniff"
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "i386": "386", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64", "armv7l": "arm/v7", "armv6l": "arm/v6", "mips64": "mips64le"}


@dataclass(frozen=True, slots=True)
class OciOptions:
    """How an image source is read. ``platform``: ``OS/ARCH[/VARIANT]`` (None: this machine).
    ``digest_store``: fill this object store. ``threads``: 1 reads layers in the calling thread
    only; more (or None) decompresses in a helper thread. ``ratio_limit``: the decompression
    bomb limit. The rest as for the directory source."""

    platform: str | None = None
    use_epoch: bool = False
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    digest_store: PathArg | None = None
    threads: int | None = None
    ratio_limit: int = RATIO_LIMIT


@dataclass(frozen=True, slots=True)
class ImageTree:
    """The merged tree of an image, the digest naming the image (``sha256:...``; None for
    plain layer files) and the config digest (None for plain layer files)."""

    root: Node
    manifest_digest: str | None
    config_digest: str | None = None


@dataclass(frozen=True, slots=True)
class _Layer:
    name: str            # for messages
    open: Any            # () -> BinaryIO
    size: int | None
    digest: str | None
    compression: str | None   # "sniff": find out by magic
    diff_id: str | None


def host_platform() -> str:
    """This machine's platform as OCI writes it (``linux/amd64``, ``linux/arm/v7``...)."""
    machine = _platform.machine().lower()
    return "linux/" + _ARCH.get(machine, machine)


def _json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LayerError(f"{name}: bad JSON ({exc})") from None


def _field(doc: Any, key: str, kind: type, name: str) -> Any:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise LayerError(f"{name}: missing or bad '{key}'")
    return value


def _check_descriptor(desc: Any, name: str) -> tuple[str, int, str]:
    """(mediaType, size, digest) of a descriptor, checked."""
    if not isinstance(desc, dict):
        raise LayerError(f"{name}: a descriptor is not an object")
    digest = desc.get("digest")
    size = desc.get("size")
    media = desc.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise LayerError(f"{name}: bad or unsupported digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LayerError(f"{name}: bad size in the descriptor of {digest}")
    if not isinstance(media, str):
        raise LayerError(f"{name}: bad mediaType in the descriptor of {digest}")
    return media, size, digest


# -- where blobs come from ------------------------------------------------------------------------

class _Slice:
    """``read(n)`` over ``[offset, offset + size)`` of a file (a member of an archive)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._pos, self._end = fd, offset, offset + size

    def read(self, n: int) -> bytes:
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


class _Files:
    """Named files of a layout directory or of an archive (indexed without reading data)."""

    def __init__(self, path: str, archive: bool) -> None:
        self.path = path
        self.archive = archive
        self._members: dict[bytes, tuple[int, int]] = {}
        self._fd = -1
        if not archive:
            return
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LayerError(f"{path}: {exc.strerror}") from None
        self._index()

    def _index(self) -> None:
        """Member name -> (offset, size), reading only the headers (seeking over data)."""
        f = os.fdopen(os.dup(self._fd), "rb", buffering=0)
        with f:
            reader = _SeekingTarReader(f, self.path)
            for entry in reader:
                if entry.kind == b"0":
                    self._members[entry.name] = (reader.position(), entry.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def exists(self, name: str) -> bool:
        if self.archive:
            return name.encode() in self._members
        return os.path.isfile(os.path.join(self.path, name))

    def open(self, name: str) -> tuple[Any, int]:
        """A reader of the file and its size."""
        if self.archive:
            found = self._members.get(os.path.normpath(name).encode())
            if found is None:
                raise LayerError(f"{self.path}: {name} is missing from the archive")
            offset, size = found
            return _Slice(self._fd, offset, size), size
        full = os.path.join(self.path, name)
        try:
            f: BinaryIO = open(full, "rb", buffering=0)  # noqa: SIM115 - closed by the caller
            return f, os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise LayerError(f"{full}: missing") from None
        except OSError as exc:
            raise LayerError(f"{full}: {exc.strerror}") from None

    def read_bytes(self, name: str, size: int | None = None, digest: str | None = None,
                   shown: str | None = None) -> bytes:
        """A whole (small) file, checked against ``size`` and ``digest`` when given."""
        shown = shown or name
        reader, actual = self.open(name)
        try:
            if actual > JSON_MAX:
                raise LayerError(f"{shown}: {actual} bytes, more than a JSON document may have")
            blob = VerifiedBlob(reader, shown, size, digest)
            return b"".join(iter(lambda: blob.read(1 << 20), b""))
        finally:
            if hasattr(reader, "close"):
                reader.close()

    def read_json(self, name: str, size: int | None = None, digest: str | None = None,
                  shown: str | None = None) -> Any:
        return _json(self.read_bytes(name, size, digest, shown), shown or name)


class _SeekingTarReader(TarReader):
    """A ``TarReader`` over a seekable file that seeks over member data instead of reading it,
    and knows the file position of the current member's data."""

    def __init__(self, f: BinaryIO, source: str) -> None:
        self._file = f
        super().__init__(f, source)

    def position(self) -> int:
        return self._file.tell() - (len(self._buf) - self._pos)

    def _skip(self, n: int) -> None:
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        self._file.seek(n - have, os.SEEK_CUR)
        self._buf, self._pos = b"", 0


# -- finding the image ------------------------------------------------------------------------------

def _blob_name(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _platform_of(desc: dict) -> str:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return "?"
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return text + (f"/{p['variant']}" if p.get("variant") else "")


def _platform_matches(desc: dict, wanted: str) -> bool:
    have = _platform_of(desc)
    if have == wanted:
        return True
    # "linux/arm64" matches an entry with a variant ("linux/arm64/v8") when none was asked for
    return wanted.count("/") == 1 and have.startswith(wanted + "/")


class _OciLayout:
    def __init__(self, files: _Files, source: ImageSource) -> None:
        self.files = files
        self.source = source
        where = source.path
        if not files.exists("oci-layout"):
            raise LayerError(f"{where}: not an OCI image layout (no oci-layout file)")
        layout = files.read_json("oci-layout", shown=f"{where}/oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise LayerError(f"{where}/oci-layout: unsupported imageLayoutVersion {version!r}")

    def blob_json(self, desc: dict, what: str) -> Any:
        media, size, digest = _check_descriptor(desc, f"{self.source.path}: {what}")
        return self.files.read_json(_blob_name(digest), size, digest,
                                    shown=f"{self.source.path}: blob {digest}")

    def choose(self, platform: str) -> tuple[dict, str]:
        """The manifest document and its digest."""
        where = self.source.path
        index = self.files.read_json("index.json", shown=f"{where}/index.json")
        manifests = _field(index, "manifests", list, f"{where}/index.json")
        ref = self.source.ref
        if ref is not None:
            found = [d for d in manifests if isinstance(d, dict)
                     and (d.get("annotations") or {}).get(REF_ANNOTATION) == ref]
            if not found:
                names = sorted({str((d.get("annotations") or {}).get(REF_ANNOTATION))
                                for d in manifests if isinstance(d, dict)})
                raise LayerError(f"{where}: no image named {ref!r} (the layout has: "
                                 f"{', '.join(names) or 'none'})")
        else:
            found = [d for d in manifests if isinstance(d, dict)]
            if len(found) > 1:
                matching = [d for d in found if d.get("mediaType") in MANIFEST_TYPES
                            and _platform_matches(d, platform)]
                if len(matching) == 1 and all(
                        REF_ANNOTATION not in (d.get("annotations") or {}) for d in found):
                    found = matching
                else:
                    names = [f"{(d.get('annotations') or {}).get(REF_ANNOTATION, '(no name)')}"
                             f" {d.get('digest')}" for d in found]
                    raise LayerError(f"{where}: several images, give one as {self.source.transport}:"
                                     f"PATH:REF: {'; '.join(names)}")
        if not found:
            raise LayerError(f"{where}/index.json: no image")
        if len(found) > 1:
            raise LayerError(f"{where}: several images are named {ref!r}")
        desc = found[0]
        for _depth in range(8):
            media, _, digest = _check_descriptor(desc, f"{where}/index.json")
            doc = self.blob_json(desc, "image")
            media = media or (doc.get("mediaType", "") if isinstance(doc, dict) else "")
            if media in INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc
                                        and "layers" not in doc):
                entries = _field(doc, "manifests", list, f"{where}: blob {digest}")
                candidates = [d for d in entries if isinstance(d, dict)
                              and _platform_matches(d, platform)]
                if not candidates:
                    have = ", ".join(sorted({_platform_of(d) for d in entries
                                             if isinstance(d, dict)}))
                    raise LayerError(f"{where}: blob {digest}: no image for platform "
                                     f"{platform} (it has: {have or 'none'})")
                desc = candidates[0]
                continue
            if media and media not in MANIFEST_TYPES:
                raise LayerError(f"{where}: blob {digest}: unknown manifest media type {media}")
            return doc, digest
        raise LayerError(f"{where}: image indexes nested too deeply")

    def layers(self, platform: str) -> tuple[list[_Layer], str, str]:
        manifest, manifest_digest = self.choose(platform)
        where = f"{self.source.path}: blob {manifest_digest}"
        config_desc = _field(manifest, "config", dict, where)
        _, _, config_digest = _check_descriptor(config_desc, where)
        config = self.blob_json(config_desc, "config")
        diff_ids = _diff_ids(config, f"{self.source.path}: blob {config_digest}")
        descs = _field(manifest, "layers", list, where)
        if len(descs) != len(diff_ids):
            raise LayerError(f"{where}: {len(descs)} layers but the config lists "
                             f"{len(diff_ids)} diff_ids")
        layers = []
        for desc, diff_id in zip(descs, diff_ids):
            media, size, digest = _check_descriptor(desc, where)
            if media not in LAYER_MEDIA_TYPES:
                raise LayerError(f"{self.source.path}: blob {digest}: unknown layer media type "
                                 f"{media or '(none)'}")
            name = _blob_name(digest)
            layers.append(_Layer(f"{self.source.path}: blob {digest}",
                                 (lambda n=name: self.files.open(n)[0]),
                                 size, digest, LAYER_MEDIA_TYPES[media], diff_id))
        return layers, manifest_digest, config_digest


def _diff_ids(config: Any, where: str) -> list[str]:
    rootfs = _field(config, "rootfs", dict, where)
    diff_ids = _field(rootfs, "diff_ids", list, where)
    for d in diff_ids:
        if not isinstance(d, str) or not _DIGEST.match(d) or not d.startswith("sha256:"):
            raise LayerError(f"{where}: bad diff_id {d!r}")
    return diff_ids


def _docker_name(ref: str) -> str:
    """A docker reference in full: ``busybox`` -> ``docker.io/library/busybox:latest``."""
    if ":" not in ref.rpartition("/")[2] and "@" not in ref:
        ref += ":latest"
    first, slash, rest = ref.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        ref = "docker.io/" + ref
    if ref.startswith("docker.io/") and "/" not in ref[10:]:
        ref = "docker.io/library/" + ref[10:]
    return ref


def _docker_layers(files: _Files, source: ImageSource) -> tuple[list[_Layer], str, str]:
    where = source.path
    manifest = files.read_json("manifest.json", shown=f"{where}: manifest.json")
    if not isinstance(manifest, list) or not all(isinstance(m, dict) for m in manifest):
        raise LayerError(f"{where}: manifest.json: not a list of images")
    ref = source.ref
    if ref is not None and ref.startswith("@") and ref[1:].isdigit():
        index = int(ref[1:])
        if index >= len(manifest):
            raise LayerError(f"{where}: no image {ref} (the archive has {len(manifest)})")
        chosen = [manifest[index]]
    elif ref is not None:
        wanted = _docker_name(ref)
        chosen = [m for m in manifest
                  if wanted in {_docker_name(t) for t in (m.get("RepoTags") or [])
                                if isinstance(t, str)}]
        if not chosen:
            tags = sorted(t for m in manifest for t in (m.get("RepoTags") or []))
            raise LayerError(f"{where}: no image tagged {ref!r} (the archive has: "
                             f"{', '.join(tags) or 'no tags'})")
    else:
        chosen = manifest
        if len(chosen) > 1:
            tags = [",".join(m.get("RepoTags") or []) or f"@{i}" for i, m in enumerate(manifest)]
            raise LayerError(f"{where}: several images, give one as docker-archive:PATH:TAG "
                             f"or :@N: {'; '.join(tags)}")
    if not chosen:
        raise LayerError(f"{where}: manifest.json lists no image")
    image = chosen[0]
    config_name = _field(image, "Config", str, f"{where}: manifest.json")
    shown = f"{where}: {config_name}"
    # old archives name the config <hex>.json, new ones blobs/sha256/<hex>: check that digest
    stem = os.path.basename(config_name).removesuffix(".json")
    named = "sha256:" + stem if re.fullmatch(r"[0-9a-f]{64}", stem) else None
    data = files.read_bytes(config_name, None, named, shown=shown)
    config_digest = named or "sha256:" + hashlib.sha256(data).hexdigest()
    config = _json(data, shown)
    diff_ids = _diff_ids(config, f"{where}: {config_name}")
    names = _field(image, "Layers", list, f"{where}: manifest.json")
    if len(names) != len(diff_ids):
        raise LayerError(f"{where}: {len(names)} layers but the config lists "
                         f"{len(diff_ids)} diff_ids")
    layers = []
    for name, diff_id in zip(names, diff_ids):
        if not isinstance(name, str):
            raise LayerError(f"{where}: manifest.json: bad layer name {name!r}")
        if not files.exists(os.path.normpath(name)):
            raise LayerError(f"{where}: layer {name} is missing from the archive")
        layers.append(_Layer(f"{where}: layer {name}", (lambda n=name: files.open(n)[0]),
                             None, None, _SNIFF, diff_id))
    return layers, config_digest, config_digest


def _tar_layers(source: ImageSource) -> list[_Layer]:
    layers = []
    for path in source.layers:
        if path == "-":
            layers.append(_Layer("<stdin>", lambda: _Peek(sys.stdin.buffer, b""), None, None,
                                 _SNIFF, None))
            continue

        def opener(p: str = path) -> BinaryIO:
            try:
                return open(p, "rb", buffering=0)  # noqa: SIM115 - closed by the caller
            except OSError as exc:
                raise LayerError(f"{p}: {exc.strerror}") from None
        layers.append(_Layer(path, opener, None, None, _SNIFF, None))
    return layers


# -- streaming one layer ---------------------------------------------------------------------------

class _Peek:
    """A reader that gives back the bytes read to sniff the compression."""

    def __init__(self, raw: Any, head: bytes) -> None:
        self._raw = raw
        self._head = head

    def read(self, n: int) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            return head
        return self._raw.read(n)


def _digest_chunks(chunks: Iterator[memoryview], size: int) -> bytes:
    """fs-verity digest of a member's data (as ``ObjectStore.add_stream`` computes it)."""
    if size <= BUFFER_SIZE:
        data = b"".join(chunks)
        return digest_bytes(data)
    hasher = FsVerityHasher()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()


def _apply_layer(layer: _Layer, merger: LayerMerger, store: Any, options: OciOptions) -> None:
    raw = layer.open()
    prefetch = None
    try:
        blob = VerifiedBlob(raw, layer.name, layer.size, layer.digest)
        compression = layer.compression
        source: Any = blob
        if compression == _SNIFF:
            head = blob.read(4)
            compression = sniff_compression(head)
            source = _Peek(blob, head)
        # the helper thread reads, checks the blob digest and decompresses; this one checks
        # the diff_id, parses and hashes the files (measured: the two halves take about the
        # same time, see README "Performance")
        stream: Any = decompressor(source, compression, layer.name)
        if options.threads != 1:
            stream = prefetch = Prefetch(stream)
        stream = CheckedStream(stream, layer.name, layer.diff_id,
                               blob if compression else None, options.ratio_limit)
        merger.begin_layer(layer.name)
        reader = TarReader(stream, layer.name)
        add = merger.add
        for entry in reader:
            node = add(entry)
            if node is None:
                continue
            size = entry.size
            if size == 0:
                continue
            if size <= INLINE_MAX:
                node.content = reader.read_all()
                continue
            if store is not None:
                member = f"{layer.name}: member {os.fsdecode(entry.member)}"
                digest = store.add_stream(reader.data(), size, member, defer=True)
            else:
                digest = _digest_chunks(reader.data(), size)
            node.digest = digest
            node.payload = object_path(digest).encode()
        reader.drain()
        merger.end_layer()
    finally:
        if prefetch is not None:
            prefetch.close()
        close = getattr(raw, "close", None)   # files we opened (stdin comes wrapped)
        if close is not None:
            close()


def _chosen_platform(options: OciOptions) -> str:
    platform = options.platform or host_platform()
    if platform.count("/") not in (1, 2) or not all(platform.split("/")):
        raise BuildInputError(f"bad platform {platform!r} (expected OS/ARCH[/VARIANT])")
    return platform


def _image_files(source: ImageSource) -> _Files:
    """The files of an ``oci``/``oci-archive``/``docker-archive`` source."""
    archive = source.transport != "oci"
    if not archive and not os.path.isdir(source.path):
        reason = "not a directory" if os.path.lexists(source.path) else "No such file or directory"
        raise LayerError(f"{source.path}: {reason}")
    return _Files(source.path, archive)


def image_digest(source: str | ImageSource, options: OciOptions | None = None) -> str | None:
    """The digest ``load_image_tree(source, options)`` returns as ``manifest_digest``, found
    without reading a layer (the index and the manifest; for docker-archive manifest.json and
    the config): cheap enough to name a built image before deciding whether to build it
    (``mkcfs mount``). None for plain layer files (``tar:``)."""
    if options is None:
        options = OciOptions()
    if isinstance(source, str):
        source = parse_source(source)
    if source.transport == "tar":
        return None
    platform = _chosen_platform(options)
    files = _image_files(source)
    try:
        if source.transport == "docker-archive":
            return _docker_layers(files, source)[1]
        return _OciLayout(files, source).choose(platform)[1]
    finally:
        files.close()


def load_image_tree(source: str | ImageSource, options: OciOptions | None = None) -> ImageTree:
    """The merged tree of an image source (see the module docstring)."""
    if options is None:
        options = OciOptions()
    if options.skip_xattrs and options.user_xattrs:
        raise BuildInputError("--user-xattrs and --skip-xattrs cannot be used together")
    if isinstance(source, str):
        source = parse_source(source)
    platform = _chosen_platform(options)
    files = None
    try:
        if source.transport == "tar":
            layers, manifest_digest, config_digest = _tar_layers(source), None, None
        else:
            files = _image_files(source)
            if source.transport == "docker-archive":
                layers, manifest_digest, config_digest = _docker_layers(files, source)
            else:
                layers, manifest_digest, config_digest = _OciLayout(files, source).layers(
                    platform)
        store = None
        if options.digest_store is not None:
            from mkcfs.store.objects import ObjectStore
            store = ObjectStore(os.fsencode(options.digest_store))
        merger = LayerMerger(MergeOptions(options.use_epoch, options.skip_devices,
                                          options.skip_xattrs, options.user_xattrs))
        try:
            for layer in layers:
                _apply_layer(layer, merger, store, options)
            if store is not None:
                store.flush()
        except BaseException:
            if store is not None:
                store.discard_pending()
            raise
        finally:
            if store is not None:
                store.close()   # its store lock; a caller writing the image holds its own
        return ImageTree(merger.finish(), manifest_digest, config_digest)
    finally:
        if files is not None:
            files.close()


def build_oci_image(source: str | ImageSource, options: OciOptions | None = None, *,
                    min_version: int = 0, max_version: int = 1):
    """``build_image`` of ``load_image_tree(source, options).root``: a ``BuiltImage``."""
    from mkcfs.build.image import build_image_from

    return build_image_from(lambda: load_image_tree(source, options).root,
                            min_version=min_version, max_version=max_version)
