"""Integer ids bit-packed at ceil(log2 V) bits each, row by row, so one token row stays one fixed-width byte slice.

GPT-2's 50,257 ids need 16 bits (no gain over uint16); a 32,000 vocabulary needs 15, a 128,256 one 17 instead of
uint32's 32. Bits are laid out big-endian within each row (``numpy.packbits`` order), padded to a whole byte.
"""

from __future__ import annotations

import numpy as np


def id_bits(vocab_size: int) -> int:
    """ceil(log2 V): the bits one id in [0, V) needs (at least 1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def packed_width(n_ids: int, bits: int) -> int:
    """Bytes one row of ``n_ids`` ids takes at ``bits`` bits each."""
    return (n_ids * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(n, k) non-negative ints < 2**bits -> (n, packed_width(k, bits)) uint8."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"pack_ids expects (n, k) ids, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or int(ids.max()) >> bits):
        raise ValueError(f"ids must be in [0, 2**{bits}), got [{ids.min()}, {ids.max()}]")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bit_rows = ((ids.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8).reshape(ids.shape[0], -1)
    return np.packbits(bit_rows, axis=-1)


def unpack_ids(packed: np.ndarray, n_ids: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: (n, packed_width(n_ids, bits)) uint8 -> (n, n_ids) int64."""
    packed = np.asarray(packed, dtype=np.uint8)
    bit_rows = np.unpackbits(packed, axis=-1, count=n_ids * bits).reshape(packed.shape[0], n_ids, bits)
    return bit_rows.astype(np.int64) @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))
