"""Feature-cache chunk files: their names, their checksums, and a reader that keeps few of them open.

``preprocessing/dataset_tools.py cache-features`` writes a cache as ``chunk-NNNNNN.npy`` files of
``chunk_size`` rows each (row = one image's encoder outputs) and records in its manifest

    "checksums": {"algorithm": "crc32", "chunks": [crc32 of each whole chunk file],
                  "rows": [crc32 of each row's bytes, in row order]}

Verification policy, sized for a 0.5 TB cache (figures in README, 'Feature caches: checksums'):
every row is checked against its crc32 when a loader reads it, i.e. before it is used, at the
cost of hashing bytes already read (crc32 runs at ~3.7 GB/s here, a full 1 + 256 token
DINOv2-B row of 395 KB in ~0.1 ms); nothing is read twice. The whole-file checksums serve
``dataset_tools.py verify``, a full sequential read for checking a copied cache offline.

Open handles: ``np.load(mmap_mode="r")`` holds one file descriptor per mapped file for as long
as the map lives, so a reader that keeps every chunk it touched open runs out of descriptors on
a large cache (``ulimit -n``). ChunkReader keeps at most MAX_OPEN_CHUNKS maps open (least
recently used closed first).
"""
from __future__ import annotations

import collections
import os
import zlib

import numpy as np

CHECKSUM = "crc32"      # zlib.crc32: in the standard library, ~3.7 GB/s (sha256 ~1.4, blake2b ~0.8 here)

# Open chunk maps per reader (one per loader worker and encoder). Rows are read in a random order,
# so a larger set would rarely be hit again before eviction: reopening a chunk costs one open +
# header parse + mmap (~0.1 ms, the page cache keeps its data either way). 16 keeps a process's
# descriptors far below the usual soft limit of 1024 with many workers and several encoders.
MAX_OPEN_CHUNKS = 16


def chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.npy"


def row_checksums(block: np.ndarray) -> list[int]:
    """crc32 of each row's bytes (C order) of a (n, ...) array."""
    return [zlib.crc32(np.ascontiguousarray(row).data) for row in block]


def file_checksum(path: str, block_bytes: int = 8 << 20) -> int:
    """crc32 of a whole file, read sequentially."""
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block_bytes):
            crc = zlib.crc32(data, crc)
    return crc


def nonfinite_count(a: np.ndarray) -> int:
    """How many entries of a float array are NaN or +-inf. float16 through its exponent bits (all ones
    = inf/NaN): ~9 GB/s, where np.isfinite on float16 manages ~1.2 GB/s."""
    if a.dtype == np.float16:
        return int(np.count_nonzero((a.view(np.uint16) & 0x7C00) == 0x7C00))
    return int(a.size - np.count_nonzero(np.isfinite(a)))


class ChecksumError(ValueError):
    """A row whose bytes differ from what cache-features wrote."""


class ChunkReader:
    """Verified rows of one cache folder, with at most MAX_OPEN_CHUNKS chunk files open at a time.

    manifest: the cache's manifest (chunk_size, num_images, item_shape, dtype); row_crc: the rows'
    recorded crc32s (uint32 array of num_images) or None for a cache written before they were
    recorded. Errors: OSError (opening: damage or a resource limit, told apart by the caller),
    ValueError (a chunk of the wrong shape or dtype), ChecksumError (a row that fails its crc32).
    Picklable: each DataLoader worker opens its own maps.
    """

    def __init__(self, folder: str, manifest: dict, row_crc: np.ndarray | None):
        self.folder = folder
        self.chunk_size, self.num_rows = int(manifest["chunk_size"]), int(manifest["num_images"])
        self.item_shape = tuple(int(s) for s in manifest["item_shape"])
        self.dtype = np.dtype(manifest.get("dtype", "float16"))
        self.row_crc = row_crc
        self._open = collections.OrderedDict()          # chunk index -> memmap, least recently used first

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = collections.OrderedDict()      # maps are reopened lazily in each worker
        return state

    def path(self, row: int) -> str:
        return os.path.join(self.folder, chunk_name(row // self.chunk_size))

    def _chunk(self, c: int) -> np.ndarray:
        arr = self._open.get(c)
        if arr is not None:
            self._open.move_to_end(c)
            return arr
        while len(self._open) >= MAX_OPEN_CHUNKS:
            self._open.popitem(last=False)              # the last reference: its map and descriptor go now
        arr = np.load(os.path.join(self.folder, chunk_name(c)), mmap_mode="r")   # (n, *item_shape)
        rows = min(self.chunk_size, self.num_rows - c * self.chunk_size)
        if arr.shape != (rows, *self.item_shape) or arr.dtype != self.dtype:
            raise ValueError(f"holds {arr.dtype} {tuple(arr.shape)}, expected {self.dtype} {(rows, *self.item_shape)}")
        self._open[c] = arr
        return arr

    def row(self, row: int, first_only: bool = False) -> np.ndarray:
        """Row `row` as a fresh array (1 + T, Z) or (Z,); first_only: its first token alone, (Z,).
        The whole row is read to check its crc32 when the cache records one."""
        entry = self._chunk(row // self.chunk_size)[row % self.chunk_size]
        if first_only and self.row_crc is None:
            return np.array(entry[0])
        out = np.array(entry)                           # one copy out of the page cache, C order
        if self.row_crc is not None and zlib.crc32(out.data) != int(self.row_crc[row]):
            raise ChecksumError(f"row {row % self.chunk_size} fails its {CHECKSUM} checksum (bytes changed "
                                f"since cache-features wrote them)")
        return out[0].copy() if first_only else out

    def close(self) -> None:
        self._open.clear()
