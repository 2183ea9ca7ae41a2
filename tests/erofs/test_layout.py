"""The layout (erofs.layout) and writer on hand-made inode records: placement rules checked one by
one.

Each test states a rule of mkcomposefs 1.0.8's layout and checks what the rule implies, in the
``InodeTable`` (nids, build time, blocks) and in the image as the reader decodes it; the golden
and conformance tests check whole images, these say which rule broke.
"""

from __future__ import annotations

import stat

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from erofs.format import (
    EROFS_BLKSIZ,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    LCFS_EROFS_FLAGS_HAS_ACL,
    LCFS_MAX_SHARED_XATTRS,
)
from erofs.errors import InternalError
from erofs.layout import (
    INODES_START,
    InodeRecord,
    InodeTable,
    LayoutError,
    dirent_split,
    lay_out_inodes,
    plan_xattrs,
)
from erofs.reader import Image, Inode
from erofs.writer import build_image, emit_image

T = 1_700_000_000


def _dir(children: list[tuple[bytes, int]], parent: int = 0, index: int = 0, mtime: int = T,
         xattrs=None) -> InodeRecord:
    dirents = sorted([(b".", index), (b"..", parent), *children])
    return InodeRecord(stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, mtime, 0, xattrs or [], dirents)


def _file(size: int = 0, data: bytes | None = None, external: bool = False, mtime: int = T,
          uid: int = 0, xattrs=None) -> InodeRecord:
    return InodeRecord(stat.S_IFREG | 0o644, 1, uid, 0, 0, size, mtime, 0, xattrs or [], None, data,
                       external)


def _link(target: bytes) -> InodeRecord:
    return InodeRecord(stat.S_IFLNK | 0o777, 1, 0, 0, 0, len(target), T, 0, [], None, target)


def _build(records: list[InodeRecord]) -> tuple[InodeTable, Image, list[Inode]]:
    """The inode table of ``records``, their image and its inodes in record order."""
    xattrs = plan_xattrs(records)
    table = lay_out_inodes(records, xattrs)
    nids = list(table.nids)
    image = Image(emit_image(records, table, xattrs, 1))
    return table, image, [image.inode(nid) for nid in nids]


def _tail(ino: Inode) -> int:
    """Bytes stored inline after the inode and its xattrs."""
    if ino.layout == EROFS_INODE_FLAT_INLINE:
        return ino.size % EROFS_BLKSIZ
    return 0


def test_root_first_at_the_start_of_the_inode_table():
    table, image, inodes = _build([_dir([])])
    assert table.nids[0] == INODES_START // 32 == 36 == image.root_nid
    assert inodes[0].offset == INODES_START and not inodes[0].extended


def test_compact_only_with_the_build_time_and_small_ids():
    records = [_dir([(b"a", 1), (b"b", 2), (b"c", 3)]), _file(mtime=T), _file(mtime=T + 1),
               _file(uid=70000)]
    table, image, inodes = _build(records)
    assert (table.build_time, table.build_time_nsec) == (T, 0)
    assert (image.build_time, image.build_time_nsec) == (T, 0)
    assert [not i.extended for i in inodes] == [True, True, False, False]


def test_build_time_is_the_oldest_mtime():
    table, image, inodes = _build([_dir([(b"a", 1)], mtime=T + 5), _file(mtime=T - 3)])
    assert table.build_time == image.build_time == T - 3
    assert [not i.extended for i in inodes] == [False, True]


def test_nids_follow_record_order_and_are_slot_aligned():
    records = [_dir([(b"a", 1), (b"b", 2)]), _file(), _link(b"target")]
    table, _, inodes = _build(records)
    offsets = [nid * 32 for nid in table.nids]
    assert offsets == sorted(offsets) == [i.offset for i in inodes]
    assert [i.ino for i in inodes] == [0, 1, 2]


def test_small_file_is_inline_large_file_gets_blocks():
    small = _file(100, b"x" * 100)
    large = _file(5000, b"y" * 5000)
    table, image, inodes = _build([_dir([(b"l", 2), (b"s", 1)]), small, large])
    s, big = inodes[1], inodes[2]
    assert (s.layout, _tail(s), image.extents(s)) == (EROFS_INODE_FLAT_INLINE, 100, [(s.tail_offset, 100)])
    assert (big.layout, _tail(big)) == (EROFS_INODE_FLAT_INLINE, 5000 - 4096)
    assert table.n_blocks == 1
    data_start = image.size - EROFS_BLKSIZ
    assert big.i_u == data_start // EROFS_BLKSIZ     # the first (and only) data block
    assert image.data_bytes(big, 5000) == b"y" * 5000


def test_tail_above_half_a_block_becomes_a_block():
    _, image, inodes = _build([_dir([(b"f", 1)]), _file(3000, b"z" * 3000)])
    f = inodes[1]
    assert (f.layout, _tail(f), f.i_u) == (EROFS_INODE_FLAT_PLAIN, 0, image.blocks - 1)
    assert image.data_bytes(f, 3000) == b"z" * 3000


def test_external_file_is_chunk_based_with_ff_chunk_indexes():
    size = (1 << 20) + 1
    _, image, inodes = _build([_dir([(b"e", 1)]), _file(size, external=True)])
    e = inodes[1]
    assert e.layout == EROFS_INODE_CHUNK_BASED
    assert e.i_u == 21 - 12                     # chunk format: chunkbits - 12
    assert image.data[e.tail_offset:e.tail_offset + 8] == b"\xff" * 4 + b"\0" * 4


def test_file_too_large_for_the_chunk_map():
    with pytest.raises(LayoutError):
        build_image([_dir([(b"e", 1)]), _file(1 << 60, external=True)], 1)


def test_shared_xattrs_are_pairs_used_twice_sorted_descending():
    a = [(b"user.a", b"1"), (b"user.b", b"2")]
    records = [_dir([(b"f", 1), (b"g", 2)], xattrs=[(b"user.b", b"2")]),
               _file(xattrs=a), _file(xattrs=[(b"user.a", b"1"), (b"user.c", b"3")])]
    xattrs = plan_xattrs(records)
    shared = xattrs.table
    assert len(shared) == 2                    # user.a=1 and user.b=2 appear twice, user.c once
    assert shared[0][4:5] == b"b" and shared[1][4:5] == b"a"   # sorted by key, descending
    _, image, inodes = _build(records)
    f, g = inodes[1], inodes[2]
    (f_inline, f_ids), (g_inline, g_ids) = image.xattr_body(f), image.xattr_body(g)
    assert len(f_ids) == 2 and len(f_inline) == 0
    assert len(g_ids) == 1 and [(i, bytes(s)) for i, s, _, _ in g_inline] == [(1, b"c")]
    assert f.xattr_size == 12 + 8 and g.xattr_size == 12 + 4 + ((4 + 1 + 1 + 3) & ~3)
    assert sorted((e.key, e.value) for e in image.xattrs(g)) == [(b"user.a", b"1"), (b"user.c", b"3")]
    assert sorted((e.key, e.value) for e in image.xattrs(f)) == a


def test_at_most_128_shared_references_per_inode():
    many = [(b"user.k%03d" % i, b"v") for i in range(LCFS_MAX_SHARED_XATTRS + 5)]
    _, image, inodes = _build([_dir([(b"f", 1), (b"g", 2)]), _file(xattrs=many), _file(xattrs=many)])
    inline, ids = image.xattr_body(inodes[1])
    assert len(ids) == LCFS_MAX_SHARED_XATTRS and len(inline) == 5


def test_acl_sets_the_header_flag():
    acl = [(b"system.posix_acl_access", b"\x02\x00\x00\x00")]
    assert _build([_dir([(b"f", 1)]), _file(xattrs=acl)])[1].flags == LCFS_EROFS_FLAGS_HAS_ACL
    assert _build([_dir([(b"f", 1)]), _file()])[1].flags == 0
    acl_twice = [_dir([(b"f", 1), (b"g", 2)]), _file(xattrs=acl), _file(xattrs=acl)]
    assert _build(acl_twice)[1].flags == LCFS_EROFS_FLAGS_HAS_ACL      # a shared ACL too


def test_dirent_split_fills_blocks_and_keeps_a_small_tail():
    names = [(b"n%04d" % i, 0) for i in range(400)]     # 17 bytes each: 240 per block
    chunks, tail = dirent_split(names)
    assert chunks == [(0, 240), (240, 400)]
    assert tail == 0                            # 160 * 17 > 2048: a full block instead
    chunks, tail = dirent_split(names[:340])
    assert chunks == [(0, 240), (240, 340)] and tail == 100 * 17
    chunks, tail = dirent_split(names[:10])
    assert chunks == [(0, 10)] and tail == 170


def _greedy_split(dirents: list[tuple[bytes, int]]) -> tuple[list[tuple[int, int]], int]:
    """dirent_split's definition, one dirent at a time: a block takes dirents while they fit."""
    chunks, block_size, first = [], 0, 0
    for i, (name, _) in enumerate(dirents):
        if block_size + 12 + len(name) > EROFS_BLKSIZ:
            chunks.append((first, i))
            block_size, first = 0, i
        block_size += 12 + len(name)
    chunks.append((first, len(dirents)))
    return chunks, (block_size if block_size <= EROFS_BLKSIZ // 2 else 0)


# dirents of 16, 32, 64 or 128 bytes (names of 4, 20, 52, 116) often fill a block exactly
@given(st.one_of(st.lists(st.sampled_from([4, 20, 52, 116]), max_size=900),
                 st.lists(st.integers(1, 255), max_size=700)))
@example([4] * 600)
@settings(max_examples=300, deadline=None)
def test_dirent_split_is_the_greedy_split(lengths):
    dirents = [(b"x" * n, 0) for n in lengths]
    assert dirent_split(dirents) == _greedy_split(dirents)


@pytest.mark.parametrize("n_files, tail_inline", [(10, True), (230, False), (300, True), (400, False)])
def test_directory_blocks_and_tail_hold_every_entry(n_files, tail_inline):
    names = [b"n%04d" % i for i in range(n_files)]       # 17 bytes per dirent
    records = [_dir([(name, i + 1) for i, name in enumerate(names)])]
    records += [_file() for _ in names]
    table, image, inodes = _build(records)
    root = inodes[0]
    assert (root.layout == EROFS_INODE_FLAT_INLINE) == tail_inline
    listed = sorted((name, nid) for name, nid, _ in image.dirents(root))
    expected = sorted([(b".", table.nids[0]), (b"..", table.nids[0])]
                      + [(name, table.nids[i + 1]) for i, name in enumerate(names)])
    assert listed == expected


def test_inline_tail_never_crosses_a_block():
    records = [_dir([(b"f%03d" % i, i + 1) for i in range(60)])]
    records += [_file(1000, b"q" * 1000) for _ in range(60)]
    _, _, inodes = _build(records)
    moved = 0
    end = inodes[0].tail_offset + _tail(inodes[0])
    for ino in inodes[1:]:
        tail = _tail(ino)
        assert tail == 1000
        assert ino.tail_offset // EROFS_BLKSIZ == (ino.tail_offset + tail - 1) // EROFS_BLKSIZ
        moved += ino.offset > (end + 31) & ~31
        end = ino.tail_offset + tail
    assert moved      # some inodes had to be pushed to keep their tail in one block


def test_long_symlink_target_moves_to_a_block():
    target = b"t" * 4070                    # 32 + 4070 bytes reach a block
    _, image, inodes = _build([_dir([(b"l", 1)]), _link(target)])
    link = inodes[1]
    assert (link.layout, link.size, link.offset % EROFS_BLKSIZ) == (EROFS_INODE_FLAT_PLAIN, 4070, 0)
    assert image.data_bytes(link, 4096) == target


def test_layout_leaves_the_records_unchanged():
    records = [_dir([(b"a", 1)]), _file(10, b"0123456789")]
    before = [(r.mode, r.size, r.xattrs, r.dirents, r.data) for r in records]
    build_image(records, 1)
    assert [(r.mode, r.size, r.xattrs, r.dirents, r.data) for r in records] == before
    assert not hasattr(records[0], "nid")


def test_a_layout_writer_disagreement_is_an_internal_error():
    records = [_dir([(b"a", 1)]), _file(10, b"0123456789")]
    xattrs = plan_xattrs(records)
    table = lay_out_inodes(records, xattrs)
    table.dirs[2] += 1              # the root's inline dirents said to be one byte longer
    with pytest.raises(InternalError):
        emit_image(records, table, xattrs, 1)
