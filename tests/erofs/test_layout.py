"""The planner (erofs.layout) on hand-made inode records: placement rules checked one by one.

Each test states a rule of mkcomposefs 1.0.8's layout and checks the plan the rule implies; the
golden and conformance tests check whole images, these say which rule broke.
"""

from __future__ import annotations

import stat

import pytest

from erofs.format import (
    EROFS_BLKSIZ,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    LCFS_MAX_SHARED_XATTRS,
)
from erofs.layout import INODES_START, InodeRecord, LayoutError, dirent_split, plan_image
from erofs.writer import emit_image

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


def test_root_first_at_the_start_of_the_inode_table():
    plan = plan_image([_dir([])])
    root = plan.inodes[0]
    assert root.nid == INODES_START // 32 == 36
    assert root.pad == 0 and root.compact
    assert plan.records[0].dirents is not None


def test_compact_only_with_the_build_time_and_small_ids():
    records = [_dir([(b"a", 1), (b"b", 2), (b"c", 3)]), _file(mtime=T), _file(mtime=T + 1),
               _file(uid=70000)]
    plan = plan_image(records)
    assert (plan.build_time, plan.build_time_nsec) == (T, 0)
    assert [i.compact for i in plan.inodes] == [True, True, False, False]


def test_build_time_is_the_oldest_mtime():
    plan = plan_image([_dir([(b"a", 1)], mtime=T + 5), _file(mtime=T - 3)])
    assert plan.build_time == T - 3
    assert [i.compact for i in plan.inodes] == [False, True]


def test_nids_follow_record_order_and_are_slot_aligned():
    records = [_dir([(b"a", 1), (b"b", 2)]), _file(), _link(b"target")]
    plan = plan_image(records)
    offsets = [i.nid * 32 for i in plan.inodes]
    assert offsets == sorted(offsets)
    assert all(i.nid * 32 % 32 == 0 for i in plan.inodes)


def test_small_file_is_inline_large_file_gets_blocks():
    small = _file(100, b"x" * 100)
    large = _file(5000, b"y" * 5000)
    plan = plan_image([_dir([(b"l", 2), (b"s", 1)]), small, large])
    s, big = plan.inodes[1], plan.inodes[2]
    assert (s.datalayout, s.tail, s.n_blocks) == (EROFS_INODE_FLAT_INLINE, 100, 0)
    assert (big.datalayout, big.tail, big.n_blocks) == (EROFS_INODE_FLAT_INLINE, 5000 - 4096, 1)
    assert big.i_u == big.first_block == plan.data_start // EROFS_BLKSIZ + plan.inodes[0].n_blocks


def test_tail_above_half_a_block_becomes_a_block():
    plan = plan_image([_dir([(b"f", 1)]), _file(3000, b"z" * 3000)])
    f = plan.inodes[1]
    assert (f.datalayout, f.tail, f.n_blocks) == (EROFS_INODE_FLAT_PLAIN, 0, 1)


def test_external_file_is_chunk_based_with_ff_chunk_indexes():
    size = (1 << 20) + 1
    plan = plan_image([_dir([(b"e", 1)]), _file(size, external=True)])
    e = plan.inodes[1]
    assert e.datalayout == EROFS_INODE_CHUNK_BASED
    assert e.chunkbits == 21 and e.tail == 4 and e.i_u == 21 - 12
    image = emit_image(plan, 1)
    tail_at = e.nid * 32 + 32 + e.xattr_size
    assert image[tail_at:tail_at + 4] == b"\xff" * 4


def test_file_too_large_for_the_chunk_map():
    with pytest.raises(LayoutError):
        plan_image([_dir([(b"e", 1)]), _file(1 << 60, external=True)])


def test_shared_xattrs_are_pairs_used_twice_sorted_descending():
    a = [(b"user.a", b"1"), (b"user.b", b"2")]
    plan = plan_image([_dir([(b"f", 1), (b"g", 2)], xattrs=[(b"user.b", b"2")]),
                       _file(xattrs=a), _file(xattrs=[(b"user.a", b"1"), (b"user.c", b"3")])])
    shared = [info.raw for info in plan.shared_table]
    assert len(shared) == 2                    # user.a=1 and user.b=2 appear twice, user.c once
    assert shared[0][4:5] == b"b" and shared[1][4:5] == b"a"   # sorted by key, descending
    f, g = plan.inodes[1], plan.inodes[2]
    assert len(f.shared) == 2 and f.inline == []
    assert len(g.shared) == 1 and g.inline == [(b"user.c", b"3")]
    assert f.xattr_size == 12 + 8 and g.xattr_size == 12 + 4 + ((4 + 1 + 1 + 3) & ~3)


def test_at_most_128_shared_references_per_inode():
    many = [(b"user.k%03d" % i, b"v") for i in range(LCFS_MAX_SHARED_XATTRS + 5)]
    plan = plan_image([_dir([(b"f", 1), (b"g", 2)]), _file(xattrs=many), _file(xattrs=many)])
    f = plan.inodes[1]
    assert len(f.shared) == LCFS_MAX_SHARED_XATTRS and len(f.inline) == 5


def test_acl_sets_the_header_flag():
    acl = [(b"system.posix_acl_access", b"\x02\x00\x00\x00")]
    assert plan_image([_dir([(b"f", 1)]), _file(xattrs=acl)]).has_acl
    assert not plan_image([_dir([(b"f", 1)]), _file()]).has_acl


def test_dirent_split_fills_blocks_and_keeps_a_small_tail():
    names = [(b"n%04d" % i, 0) for i in range(400)]     # 17 bytes each: 240 per block
    chunks, tail = dirent_split(names)
    assert chunks == [(0, 240), (240, 400)]
    assert tail == 0                            # 160 * 17 > 2048: a full block instead
    chunks, tail = dirent_split(names[:340])
    assert chunks == [(0, 240), (240, 340)] and tail == 100 * 17
    chunks, tail = dirent_split(names[:10])
    assert chunks == [(0, 10)] and tail == 170


def test_inline_tail_never_crosses_a_block():
    records = [_dir([(b"f%03d" % i, i + 1) for i in range(60)])]
    records += [_file(1000, b"q" * 1000) for _ in range(60)]
    plan = plan_image(records)
    moved = 0
    for ino in plan.inodes[1:]:
        tail_start = ino.nid * 32 + 32 + ino.xattr_size
        assert tail_start // EROFS_BLKSIZ == (tail_start + ino.tail - 1) // EROFS_BLKSIZ
        moved += ino.pad > 0
    assert moved      # some inodes had to be pushed to keep their tail in one block


def test_planner_leaves_the_records_unchanged():
    records = [_dir([(b"a", 1)]), _file(10, b"0123456789")]
    before = [(r.mode, r.size, r.xattrs, r.dirents, r.data) for r in records]
    plan_image(records)
    assert [(r.mode, r.size, r.xattrs, r.dirents, r.data) for r in records] == before
    assert not hasattr(records[0], "nid")
