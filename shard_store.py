"""The sample store of a generate.py run: atomic .npz shards of images, checked on resume, and the
final NAME.npz assembled from them in index order.

    {sample_dir}/NAME/          shards (atomic .npz batches: images, labels, indices), config.json,
                                and with --save-png one {index:06d}.png per image
    {sample_dir}/NAME.npz       arr_0 (N, H, W, 3) uint8 in index order (the ADM evaluator's input),
                                arr_1 (N,) class labels; the same bytes whatever the run's history
    {sample_dir}/NAME.json      everything that determines the result, plus how it was run

A shard marks its images done. A rerun keeps the shards already written and samples the rest (the
per-image scheme: any world size or batch size; release: the same ones, since they decide the
noise); a damaged shard is reported, deleted and sampled again.
"""
from __future__ import annotations

import math
import os
import re
import time
import zipfile
import zlib

import numpy as np
from PIL import Image

from fileio import atomic_open, atomic_save_npz, atomic_write_json, is_temp_file, read_json
from runtime import one_line

SHARD_RE = re.compile(r"^(img-\d{7}-\d{7}|rank\d{3}-batch\d{6})\.npz$")
SHARD_KEYS = ("images", "labels", "indices")
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # NAME.npz's member timestamps: equal runs give equal bytes


class ShardError(ValueError):
    """A shard that cannot be trusted (truncated, damaged, incomplete, wrong shapes)."""


def list_shards(folder: str) -> list[str]:
    """The shard files of a run folder (never the temp files of atomic writes), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if SHARD_RE.match(f) and not is_temp_file(f))


def _npy_header(f) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ShardError(f"unknown .npy version {version}")
    if fortran:
        raise ShardError("images stored in Fortran order")
    return tuple(shape), np.dtype(dtype)


def read_shard_indices(path: str, resolution: int | None = None) -> np.ndarray:
    """The image indices of a shard, after checking it: the three arrays present, indices and labels
    readable, images uint8 (n, R, R, 3) with all their bytes there. Raises ShardError."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = [k for k in SHARD_KEYS if f"{k}.npy" not in names]
            if missing:
                raise ShardError(f"no {', '.join(missing)} array")
            with zf.open("indices.npy") as f:
                indices = np.lib.format.read_array(f, allow_pickle=False)
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
            info = zf.getinfo("images.npy")
            with zf.open(info) as f:
                shape, dtype = _npy_header(f)
                header_bytes = f.tell()
    except ShardError:
        raise
    except PermissionError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError) as e:
        raise ShardError(one_line(e)) from None
    n = len(indices) if indices.ndim == 1 else -1
    if n < 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ShardError(f"indices are {indices.dtype} {indices.shape}, expected a non-empty integer vector")
    if labels.shape != (n,):
        raise ShardError(f"labels have shape {labels.shape}, expected ({n},)")
    want = (n, resolution, resolution, 3) if resolution else (n, *shape[1:3], 3)
    if dtype != np.uint8 or shape != want:
        raise ShardError(f"images are {dtype} {shape}, expected uint8 {want}")
    if info.file_size != header_bytes + math.prod(shape):
        raise ShardError(f"images hold {info.file_size - header_bytes} bytes, expected {math.prod(shape)}")
    if indices.min() < 0 or len(np.unique(indices)) != n:
        raise ShardError("indices are negative or repeated")
    return indices.astype(np.int64)


def valid_shards(folder: str, resolution: int | None, log=print) -> dict[str, np.ndarray]:
    """Rank 0: {shard name: indices} of the good shards; a damaged one is named in one line, deleted
    (so that its images are sampled again) and left out."""
    good = {}
    for name in list_shards(folder):
        path = os.path.join(folder, name)
        try:
            good[name] = read_shard_indices(path, resolution)
        except ShardError as e:
            log(f"warning: shard {path} is damaged ({e}); deleting it, its images will be sampled again")
            os.remove(path)
    return good


def per_image_plan(shards: dict[str, np.ndarray], num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches [start, stop) covering the images no shard holds; each batch is contiguous, so every
    shard covers a range, whatever batch sizes earlier runs used."""
    done = np.zeros(num_images, dtype=bool)
    for idx in shards.values():
        done[idx[idx < num_images]] = True
    batches, i = [], 0
    while i < num_images:
        if done[i]:
            i += 1
            continue
        stop = i
        while stop < num_images and not done[stop] and stop - i < batch_size:
            stop += 1
        batches.append((i, stop))
        i = stop
    return batches


def release_indices(batch: int, n: int, world_size: int, rank: int) -> np.ndarray:
    """The release's image indices of a rank's batch (interleaved across ranks)."""
    return batch * n * world_size + np.arange(n) * world_size + rank


def rank_batches(todo, rank: int, world: int, seed_scheme: str, batch_size: int, num_images: int):
    """This rank's batches in order, as index arrays (None: a release batch to skip), and the number
    of images all ranks still have to sample. ``todo`` is rank 0's plan: per-image, the [start, stop)
    batches left, dealt round-robin; release, the names of the shards already written."""
    n, N = batch_size, num_images
    if seed_scheme == "per-image":
        return [np.arange(start, stop) for start, stop in todo[rank::world]], sum(b - a for a, b in todo)
    batches, remaining = [], 0
    for b in range(math.ceil(N / (n * world))):
        for r in range(world):
            idx = release_indices(b, n, world, r)
            left = f"rank{r:03d}-batch{b:06d}.npz" not in todo and (idx < N).any()
            remaining += int((idx < N).sum()) if left else 0
            if r == rank:
                batches.append(idx if left else None)
    return batches, remaining


def write_shard(folder: str, name: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    atomic_save_npz(os.path.join(folder, name), images=images, labels=labels.astype(np.int64),
                    indices=indices.astype(np.int64))


def save_pngs(folder: str, images: np.ndarray, indices: np.ndarray) -> None:
    for img, i in zip(images, indices):
        with atomic_open(os.path.join(folder, f"{int(i):06d}.png")) as f:
            Image.fromarray(img).save(f, format="PNG")


def _zip_member(zf: zipfile.ZipFile, name: str):
    """A stored member with a fixed timestamp, so the archive's bytes depend on its contents only."""
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    return zf.open(info, "w", force_zip64=True)


def assemble_npz(folder: str, num_images: int, npz_path: str) -> np.ndarray:
    """Stream the shards into ``npz_path`` (arr_0 images in index order, arr_1 labels), atomically,
    holding one block of shards in memory at a time. Returns the labels.

    A block is a run of shards (sorted by first index) whose indices form one range: a single shard in
    the per-image scheme, the world_size shards of one batch in the release's interleaved scheme."""
    entries = []                                                   # (first, last + 1, size, name)
    count = np.zeros(num_images, dtype=np.int64)
    for name in list_shards(folder):
        with np.load(os.path.join(folder, name)) as shard:
            idx = shard["indices"]
        idx = idx[idx < num_images]   # a run that asked for more images earlier leaves extra ones
        if idx.size:
            np.add.at(count, idx, 1)
            entries.append((int(idx.min()), int(idx.max()) + 1, int(idx.size), name))
    if (count != 1).any():
        raise RuntimeError(f"shards in {folder} cover {int((count > 0).sum())} of {num_images} images "
                           f"({int((count > 1).sum())} more than once); rerun generate.py to finish them")
    entries.sort()
    with np.load(os.path.join(folder, entries[0][3])) as first:
        image_shape = first["images"].shape[1:]                    # (H, W, 3)
    labels = np.empty(num_images, dtype=np.int64)

    def blocks():
        group, start, stop, covered = [], 0, 0, 0
        for _, hi, size, name in entries:
            group.append(name)
            stop, covered = max(stop, hi), covered + size
            if stop - start != covered:
                continue  # the range [start, stop) still has holes that later shards fill
            block = np.empty((covered, *image_shape), dtype=np.uint8)   # (n, H, W, 3)
            for member in group:
                with np.load(os.path.join(folder, member)) as shard:
                    idx = shard["indices"]
                    keep = idx < num_images
                    block[idx[keep] - start] = shard["images"][keep]
                    labels[idx[keep]] = shard["labels"][keep]
            yield block
            group, start, covered = [], stop, 0

    with atomic_open(npz_path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _zip_member(zf, "arr_0.npy") as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (num_images, *image_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for block in blocks():
                member.write(np.ascontiguousarray(block).data)
        with _zip_member(zf, "arr_1.npy") as member:
            np.lib.format.write_array(member, labels)
    return labels


def assemble(folder, final_json, npz_path, N, num_classes, resolution) -> str:
    """Rank 0, once every shard is written: the .npz in index order and its sidecar JSON."""
    t0 = time.time()
    labels = assemble_npz(folder, N, npz_path)
    stored = read_json(os.path.join(folder, "config.json"))
    counts = np.bincount(labels, minlength=num_classes)
    sidecar = dict(key=stored["key"], num_images=N, npz=os.path.basename(npz_path),
                   arrays={"arr_0": [N, *([resolution] * 2), 3], "arr_1": [N]},
                   label_counts={"min": int(counts.min()), "max": int(counts.max())},
                   runs=stored["runs"])
    atomic_write_json(final_json, sidecar)
    print(f"saved {npz_path} [{N} x {resolution} x {resolution} x 3] in {time.time() - t0:.1f}s; "
          f"settings in {final_json}")
    return npz_path
