"""Deterministic OCI test images: layer tars made with Python's ``tarfile``, written as an OCI
image layout, an oci-archive or a docker-archive (gzip with mtime 0, zstd via ``zstandard``)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI = "application/vnd.oci.image."


@dataclass
class M:
    """One tar member: ``kind`` one of file, dir, sym, link, chr, blk, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
          "link": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def make_tar(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode if m.kind != "dir" or m.mode != 0o644 else 0o755
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.uname = info.gname = ""
            info.linkname = m.link
            info.devmajor, info.devminor = m.dev
            info.pax_headers = dict(m.pax)
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def compress(data: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(root: Path, data: bytes) -> dict:
    digest = sha(data)
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def add_image(root: Path, layers: list[bytes], compression: str | None = "gzip",
              ref: str | None = "latest", platform: tuple[str, str] = ("linux", "amd64"),
              write_index: bool = True) -> dict:
    """Add an image (manifest, config, layer blobs) to the layout at ``root``; returns the
    manifest descriptor (also added to ``index.json`` when ``write_index``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    suffix = {"gzip": "+gzip", "zstd": "+zstd", None: ""}
    descs = []
    for layer in layers:
        d = _blob(root, compress(layer, compression))
        d["mediaType"] = OCI + "layer.v1.tar" + suffix[compression]
        descs.append(d)
    config = {"architecture": platform[1], "os": platform[0],
              "rootfs": {"type": "layers", "diff_ids": [sha(layer) for layer in layers]}}
    cdesc = _blob(root, json.dumps(config).encode())
    cdesc["mediaType"] = OCI + "config.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": OCI + "manifest.v1+json", "config": cdesc,
                "layers": descs}
    mdesc = _blob(root, json.dumps(manifest).encode())
    mdesc["mediaType"] = OCI + "manifest.v1+json"
    mdesc["platform"] = {"os": platform[0], "architecture": platform[1]}
    if ref is not None:
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    if write_index:
        _list_in_index(root, mdesc)
    return mdesc


def _list_in_index(root: Path, desc: dict) -> None:
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"].append(desc)
    index_path.write_text(json.dumps(index))


def add_index(root: Path, manifests: list[dict], ref: str | None = "multi") -> dict:
    """An image index of ``manifests`` as a blob, listed in index.json under ``ref``."""
    doc = {"schemaVersion": 2, "mediaType": OCI + "index.v1+json", "manifests": manifests}
    desc = _blob(root, json.dumps(doc).encode())
    desc["mediaType"] = OCI + "index.v1+json"
    if ref is not None:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    _list_in_index(root, desc)
    return desc


def tar_directory(src: Path, dest: Path) -> None:
    """A tar of the files below ``src`` (an oci-archive of a layout)."""
    with tarfile.open(dest, "w") as tar:
        for name in sorted(os.listdir(src)):
            tar.add(src / name, arcname=name)


def docker_archive(dest: Path, layers: list[bytes], tags: list[str]) -> None:
    """A ``docker save`` style archive (uncompressed layer tars in ``<id>/layer.tar``)."""
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [sha(layer) for layer in layers]}}
    cdata = json.dumps(config).encode()
    files = {sha(cdata)[7:] + ".json": cdata}
    names = []
    for layer in layers:
        name = hashlib.sha256(b"id" + layer).hexdigest() + "/layer.tar"
        files[name] = layer
        names.append(name)
    files["manifest.json"] = json.dumps(
        [{"Config": sha(cdata)[7:] + ".json", "RepoTags": tags, "Layers": names}]).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
