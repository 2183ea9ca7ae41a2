"""Generated from ``fsverity/structs.py`` by ``tools/gen_packers.py``: do not edit.

The ``struct`` packers of the structures declared there (fields in declaration order) and
each structure's field offsets. After changing a declaration, regenerate with
``python3 tools/gen_packers.py``; ``tests/erofs/test_format.py`` fails while this file is
stale."""

import struct


#: struct fsverity_descriptor (256 bytes)
FSVERITY_DESCRIPTOR = struct.Struct("<BBBBLQ64s32s144s")
FSVERITY_DESCRIPTOR_FIELDS = {
    "version": 0,
    "hash_algorithm": 1,
    "log_blocksize": 2,
    "salt_size": 3,
    "sig_size": 4,
    "data_size": 8,
    "root_hash": 16,
    "salt": 80,
    "reserved": 112,
}

#: struct fsverity_enable_arg (128 bytes)
FSVERITY_ENABLE_ARG = struct.Struct("<LLLLQLLQ88s")
FSVERITY_ENABLE_ARG_FIELDS = {
    "version": 0,
    "hash_algorithm": 4,
    "block_size": 8,
    "salt_size": 12,
    "salt_ptr": 16,
    "sig_size": 24,
    "reserved1": 28,
    "sig_ptr": 32,
    "reserved2": 40,
}
