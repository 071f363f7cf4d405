#!/usr/bin/env python
"""Build a training-ready dataset once: images -> PNG -> VAE latents -> cached encoder features.

    python preprocessing/dataset_tools.py convert --source RAW_DIR_OR_ZIP --dest DATA/images \\
        --resolution 256x256 --transform center-crop-dhariwal
    python preprocessing/dataset_tools.py encode --source DATA/images --dest DATA/vae-latents \\
        --model-url stabilityai/sd-vae-ft-mse
    python preprocessing/dataset_tools.py cache-features --source DATA/images \\
        --enc-type dinov2-vit-b --kind full          # -> DATA/features-dinov2-vit-b-full

Without VAE weights (the CPU demo), ``fit-pca`` fits a linear patch codec to the images and
``encode --model-url pca:FILE`` uses it in place of the SD-VAE.

Every step writes into its own folder: a ``.partial.json`` marker first (its settings), each
output file atomically (temp file + rename), ``dataset.json`` next, ``manifest.json`` last.
Rerunning the same command resumes: finished files are skipped, the manifest appears only
when everything is there. ``encode`` and ``cache-features`` split the work by rank under
``torchrun`` (NCCL on GPUs, gloo on CPU); rank 0 writes the manifest after a barrier.
Layout details: preprocessing/README.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import (IMAGE_EXTS, LABELS, MANIFEST, PARTIAL, decode_image, features_dir_name,  # noqa: E402
                     image_key, list_files)
from feature_cache import CHECKSUM, chunk_name, file_checksum, row_checksums  # noqa: E402
from fileio import (atomic_open, atomic_torch_save, atomic_write_bytes, atomic_write_json,  # noqa: E402
                    is_temp_file, npy_bytes, read_json, remove_stale_temp_files)
from data_shards import (DEFAULT_SHARD_SIZE, IMAGES_DIR, LATENTS_DIR, LAYOUT, array_shard_bytes,  # noqa: E402
                         finish_shards, remove_records, restore_records, sample_order, shard_done, shard_name,
                         verify_shards, write_shard)
from preprocessing.transforms import TRANSFORMS, apply_transform  # noqa: E402
from cli import RankZeroParser  # noqa: E402
from runtime import Procs  # noqa: E402

FORMAT_VERSION = 1
DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


#################################################################################
#                          Sources: image folders and zips                       #
#################################################################################

class ImageSource:
    """Images in a folder or a zip archive, listed once, sorted by relative path."""

    def __init__(self, path: str):
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"--source {path!r} does not exist")
        self.path = os.path.abspath(path)
        self.is_zip = os.path.isfile(path)
        self._zip = None
        if self.is_zip:
            if not zipfile.is_zipfile(path):
                raise ValueError(f"--source {path} is a file but not a zip archive; give an image folder or a .zip")
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            self._names = set(names)
            self.files = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS) and not n.endswith("/")
                                and not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/")))
        else:
            self._names = None
            self.files = list_files(self.path, IMAGE_EXTS)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None           # each worker process opens its own handle
        return state

    def read_bytes(self, relpath: str) -> bytes:
        if self.is_zip:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            return self._zip.read(relpath)
        with open(os.path.join(self.path, relpath), "rb") as f:
            return f.read()

    def read_json(self, name: str):
        if self.is_zip:
            if name not in self._names:
                return None
            import json
            with zipfile.ZipFile(self.path) as z:
                return json.loads(z.read(name))
        path = os.path.join(self.path, name)
        return read_json(path) if os.path.isfile(path) else None

    def labels(self) -> dict[str, int] | None:
        data = self.read_json(LABELS)
        if data is None or data.get("labels") is None:
            return None
        return {str(n).replace("\\", "/"): int(c) for n, c in data["labels"]}

    def require_complete(self) -> dict | None:
        """Our manifest if this is one of our folders; an error if its step never finished."""
        manifest = self.read_json(MANIFEST)
        if manifest is None and not self.is_zip and os.path.isfile(os.path.join(self.path, PARTIAL)):
            raise ValueError(f"--source {self.path} is an unfinished step (interrupted?): rerun the command "
                             f"that writes it first")
        return manifest

    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.files).encode("utf-8")).hexdigest()


def resolve_labels(source: ImageSource) -> tuple[dict[str, int], int, list[str] | None]:
    """Labels from the source's dataset.json, else from sorted top-level folder names."""
    given = source.labels()
    if given is not None:
        missing = [f for f in source.files if f not in given]
        if missing:
            raise ValueError(f"{len(missing)} images have no label in {source.path}/{LABELS}, e.g. {missing[0]}; "
                             f"add them to its labels or remove those images")
        return given, max(given[f] for f in source.files) + 1, None
    at_root = [f for f in source.files if "/" not in f]
    if at_root:
        raise ValueError(f"{len(at_root)} images have no label, e.g. {at_root[0]}: without a {LABELS} every image "
                         f"must sit in one folder per class (e.g. train/n01440764/x.JPEG)")
    class_names = sorted({f.split("/")[0] for f in source.files})
    index = {c: i for i, c in enumerate(class_names)}
    return {f: index[f.split("/")[0]] for f in source.files}, len(class_names), class_names


#################################################################################
#                                  PNG output                                    #
#################################################################################

def png_bytes(arr: np.ndarray) -> bytes:
    """Uncompressed PNG: fast to decode in the training loop."""
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


#################################################################################
#                       Step folders: marker, resume, manifest                   #
#################################################################################

def open_step(dest: str, kind: str, params: dict, write: bool = True) -> str:
    """'fresh', 'resume' or 'complete' for a step folder; errors for anything else in it."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f"--dest {dest} exists and is not a folder")
    if os.path.isdir(dest):
        # a finished step (its manifest) or an unfinished one (its marker): ours if made alike
        for name, status in ((MANIFEST, "complete"), (PARTIAL, "resume")):
            path = os.path.join(dest, name)
            if not os.path.isfile(path):
                continue
            found = read_json(path)
            if found.get("kind") == kind and found.get("params") == params:
                return status
            what = (f"already holds a finished {found.get('kind')} step made with other settings" if status == "complete"
                    else "holds an unfinished step started with other settings")
            fix = "choose another --dest" if status == "complete" else "rerun with those settings or use an empty --dest"
            raise ValueError(f"--dest {dest} {what}{_diff(found.get('params'), params)}; {fix}")
        if os.listdir(dest):
            raise ValueError(f"--dest {dest} is not empty; give a new or empty folder")
    if write:
        os.makedirs(dest, exist_ok=True)
        atomic_write_json(os.path.join(dest, PARTIAL), {"kind": kind, "params": params,
                                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return "fresh"


def start_step(ranks: Procs, dest: str, kind: str, params: dict) -> str:
    """Rank 0 reads --dest: 'fresh', 'resume' or 'complete'. A complete step whose outputs are damaged
    (missing, or cut short by a crash or a full disk) is reopened so that a rerun redoes just those;
    temp files left by killed runs are removed before any rank writes. Every rank gets the answer."""
    status = error = None
    if ranks.rank == 0:
        try:
            status = open_step(dest, kind, params, write=False)
            if status == "complete":
                status = reopen_if_damaged(dest, kind, params)
            if status == "resume":
                remove_stale_temp_files(dest, recursive=True)
        except ValueError as e:
            error = str(e)
    status, error = ranks.broadcast((status, error))
    if error:
        raise ValueError(error)
    return status


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"    # a PNG's last chunk: a file cut short lacks it


def _npy_size(shape, dtype) -> int:
    """Bytes np.save writes for an array of this shape and dtype (header included)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                "shape": tuple(int(s) for s in shape)})
    return buf.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def damaged_outputs(dest: str, kind: str, manifest: dict) -> list[str]:
    """Outputs of a finished step that are missing or cut short: cheap checks, no decoding (a PNG
    must end with its IEND chunk, a .npy must have its exact size)."""
    if manifest.get("layout") == LAYOUT:          # sharded step: each shard's recorded size
        expected = {r["name"]: r["bytes"] for r in manifest["shards"]}
        return [os.path.join(dest, n) for n, size in expected.items()
                if not os.path.isfile(os.path.join(dest, n)) or os.path.getsize(os.path.join(dest, n)) != size]
    if kind == "features":
        rows = [min(manifest["chunk_size"], manifest["num_images"] - c * manifest["chunk_size"])
                for c in range(manifest["num_chunks"])]
        expected = {chunk_name(c): _npy_size((n, *manifest["item_shape"]), manifest["dtype"]) for c, n in enumerate(rows)}
    else:
        names = [n for n, _ in (read_json(os.path.join(dest, LABELS)).get("labels") or [])]
        size = _npy_size(manifest["moments_shape"], np.float32) if kind == "latents" else None
        expected = {n: size for n in names}
    bad = []
    for name, size in expected.items():
        path = os.path.join(dest, name)
        try:
            if size is not None:
                ok = os.path.getsize(path) == size
            else:
                with open(path, "rb") as f:
                    f.seek(-len(PNG_END), os.SEEK_END)
                    ok = f.read() == PNG_END
        except OSError:
            ok = False
        if not ok:
            bad.append(path)
    return bad


def reopen_if_damaged(dest: str, kind: str, params: dict, bad: list[str] | None = None) -> str:
    """'complete', or 'resume' after removing the damaged outputs (default: damaged_outputs) and the manifest."""
    manifest = read_json(os.path.join(dest, MANIFEST))
    bad = damaged_outputs(dest, kind, manifest) if bad is None else bad
    if not bad:
        return "complete"
    print(f"{dest}: {len(bad)} damaged or missing file(s), e.g. {bad[0]}: redoing them", file=sys.stderr)
    if manifest.get("layout") == LAYOUT:
        restore_records(dest, manifest)           # the good shards count as done again
    for path in bad:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if kind == "features":
        restore_checksums(dest, manifest)
    atomic_write_json(os.path.join(dest, PARTIAL), {"kind": kind, "params": params,
                                                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "repair": True})
    os.remove(os.path.join(dest, MANIFEST))
    return "resume"


def _diff(old, new) -> str:
    if not isinstance(old, dict):
        return ""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f" (differs in: {', '.join(keys)})" if keys else ""


def finish_step(dest: str, manifest: dict) -> None:
    """Manifest last, then drop the marker and any temp files left by killed runs."""
    atomic_write_json(os.path.join(dest, MANIFEST), manifest)
    os.remove(os.path.join(dest, PARTIAL))
    for root, _, files in os.walk(dest):
        for f in files:
            if is_temp_file(f):
                os.remove(os.path.join(root, f))


def _check_not_inside(dest: str, source: ImageSource) -> None:
    d, s = os.path.abspath(dest), source.path
    if d == s or (not source.is_zip and os.path.commonpath([d, s]) == s):
        raise ValueError(f"--dest {dest} must not be inside --source {source.path}")


#################################################################################
#                                  convert                                       #
#################################################################################

_WORKER_SOURCE: ImageSource | None = None


def _set_worker_source(source: ImageSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _convert_one(task) -> tuple[int, str, str]:
    """Decode, crop and write one image. Returns (index, status, detail); status ok|bad|size."""
    idx, relpath, out_path, transform, size = task
    try:
        with PIL.Image.open(io.BytesIO(_WORKER_SOURCE.read_bytes(relpath))) as f:
            img = f.convert("RGB")          # forces a full decode: truncated files fail here
    except DECODE_ERRORS as e:
        return idx, "bad", f"{type(e).__name__}: {e}"
    arr = apply_transform(img, transform, size)
    if arr.shape != (size, size, 3):
        return idx, "size", f"{arr.shape[1]}x{arr.shape[0]}"
    atomic_write_bytes(out_path, png_bytes(arr))
    return idx, "ok", ""


def output_image_name(idx: int) -> str:
    """Release naming: 1000 images per folder, '00012/img00012345.png'."""
    return f"{idx // 1000:05d}/img{idx:08d}.png"


def convert(source: str, dest: str, resolution: int, transform: str = "center-crop-dhariwal",
            max_images: int | None = None, skip_bad_images: bool = False, workers: int = 0) -> dict:
    """Raw images -> square uncompressed PNGs + dataset.json + manifest.json. Returns a summary."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown --transform {transform!r}; choose from {', '.join(TRANSFORMS)}")
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"--resolution must be a positive multiple of 16 (VAE /8, patches, DINOv2), got {resolution}")
    if max_images is not None and max_images <= 0:
        raise ValueError(f"--max-images must be positive, got {max_images}")
    src = ImageSource(source)
    if not src.files:
        raise ValueError(f"no images found in --source {source} (looked for {', '.join(IMAGE_EXTS)})")
    labels, num_classes, class_names = resolve_labels(src)
    files = src.files[:max_images] if max_images else src.files
    _check_not_inside(dest, src)

    to_zip = dest.lower().endswith(".zip")
    out_dir = dest + ".partial" if to_zip else dest
    params = {"source": src.path, "source_fingerprint": src.fingerprint(), "resolution": resolution,
              "transform": transform, "max_images": max_images}
    if to_zip and os.path.exists(dest):
        done = ImageSource(dest).read_json(MANIFEST) if zipfile.is_zipfile(dest) else None
        if done is not None and done.get("params") == params:
            return {"status": "complete", "written": 0, "existing": len(files), "bad": []}
        raise ValueError(f"--dest {dest} already exists; give a new file name")
    status = open_step(out_dir, "images", params)
    if status == "complete" and not to_zip:
        status = reopen_if_damaged(out_dir, "images", params)
    if status == "resume":
        remove_stale_temp_files(out_dir, recursive=True)
    if status == "complete":
        return {"status": "complete", "written": 0, "existing": len(files), "bad": []}

    names = [output_image_name(i) for i in range(len(files))]
    tasks = [(i, files[i], os.path.join(out_dir, names[i]), transform, resolution)
             for i in range(len(files)) if not os.path.isfile(os.path.join(out_dir, names[i]))]
    existing = len(files) - len(tasks)
    bad, written = [], 0
    _set_worker_source(src)
    pool = multiprocessing.Pool(workers, initializer=_set_worker_source, initargs=(src,)) if workers > 0 else None
    try:
        results = pool.imap_unordered(_convert_one, tasks, chunksize=8) if pool else map(_convert_one, tasks)
        for idx, state, detail in tqdm(results, total=len(tasks), initial=0, desc="convert", unit="img"):
            if state == "bad":
                if not skip_bad_images:
                    raise ValueError(f"cannot read image {os.path.join(src.path, files[idx])} ({detail}); fix or "
                                     f"remove it, or pass --skip-bad-images to skip and count such files")
                bad.append(files[idx])
            elif state == "size":
                raise ValueError(f"mixed resolutions: {os.path.join(src.path, files[idx])} is {detail}, the dataset "
                                 f"is {resolution}x{resolution}; use --transform center-crop-dhariwal or center-crop")
            else:
                written += 1
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    bad_set = set(bad)
    kept = [i for i in range(len(files)) if files[i] not in bad_set]
    if not kept:
        raise ValueError(f"every image in --source {source} failed to decode")
    atomic_write_json(os.path.join(out_dir, LABELS), {"labels": [[names[i], labels[files[i]]] for i in kept]})
    manifest = {"kind": "images", "format": FORMAT_VERSION, "params": params, "resolution": resolution,
                "num_images": len(kept), "num_classes": num_classes, "class_names": class_names,
                "transform": transform, "num_bad": len(bad), "bad_files": sorted(bad)[:1000]}
    finish_step(out_dir, manifest)
    if to_zip:
        _pack_zip(out_dir, dest)
    return {"status": status, "written": written, "existing": existing, "bad": sorted(bad)}


def _pack_zip(folder: str, dest: str) -> None:
    """Folder -> uncompressed zip (manifest last), written atomically; the folder is removed."""
    rel = list_files(folder, (".png", ".json"))
    rel = [r for r in rel if r != MANIFEST] + [MANIFEST]
    with atomic_open(dest) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for r in rel:
            z.write(os.path.join(folder, r), r)
    shutil.rmtree(folder)


#################################################################################
#                        Distributed work splitting (torchrun)                   #
#################################################################################

class _ImageFiles(torch.utils.data.Dataset):
    """(position, uint8 (3, H, W) or None, error or None) for DataLoader workers."""

    def __init__(self, source: ImageSource, relpaths: list[str]):
        self.source, self.relpaths = source, relpaths

    def __len__(self):
        return len(self.relpaths)

    def __getitem__(self, i):
        rel = self.relpaths[i]
        try:
            return i, decode_image(self.source.read_bytes(rel), rel), None
        except DECODE_ERRORS as e:
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    """(positions, the images stacked into one uint8 (B, 3, H, W) tensor, problems): stacked in the
    worker, so the loader pins the very tensor that is copied to the GPU (no pageable copy)."""
    positions = [i for i, _, _ in batch]
    problems = [(i, err) for i, img, err in batch if err is not None]
    shapes = {tuple(img.shape) for _, img, err in batch if err is None}
    if problems or len(shapes) != 1:
        return positions, None, problems or [(i, tuple(img.shape[-2:])) for i, img, _ in batch]
    return positions, torch.stack([img for _, img, _ in batch]), []


def _batches(source: ImageSource, relpaths: list[str], batch_size: int, workers: int, device,
             resolution: int | None = None):
    """(positions, uint8 (B, 3, R, R)) batches, pinned when the device is a GPU; a clear error for a
    file that does not decode or (when ``resolution`` is given) is not R x R."""
    loader = torch.utils.data.DataLoader(_ImageFiles(source, relpaths), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    for positions, images, problems in loader:
        for i, err in problems:
            if isinstance(err, str):
                raise ValueError(f"cannot decode {os.path.join(source.path, relpaths[i])} ({err}); rerun convert "
                                 f"or remove it")
        sizes = problems or [(positions[0], tuple(images.shape[-2:]))]
        want = (resolution, resolution) if resolution is not None else sizes[0][1]
        odd = next(((i, s) for i, s in sizes if s != want), None)
        if odd is not None:
            (i, (h, w)) = odd
            raise ValueError(f"mixed resolutions: {os.path.join(source.path, relpaths[i])} is {w}x{h}, expected "
                             f"{want[1]}x{want[0]}; rerun convert with one --resolution")
        yield positions, images


def _source_resolution(src: ImageSource, manifest: dict | None) -> int:
    if manifest is not None and manifest.get("resolution"):
        return int(manifest["resolution"])
    first = decode_image(src.read_bytes(src.files[0]), src.files[0])
    if first.shape[-1] != first.shape[-2]:
        raise ValueError(f"images must be square, {src.files[0]} is {first.shape[-1]}x{first.shape[-2]}; run convert")
    return int(first.shape[-1])


def _open_source_for_step(source: str) -> tuple[ImageSource, dict | None, dict[str, int]]:
    src = ImageSource(source)
    manifest = src.require_complete()
    if not src.files:
        raise ValueError(f"no images found in --source {source}")
    labels = src.labels()
    if labels is None:
        raise ValueError(f"--source {source} has no {LABELS} with labels; make it with the convert command")
    missing = [f for f in src.files if f not in labels]
    if missing:
        raise ValueError(f"{len(missing)} images have no label in {src.path}/{LABELS}, e.g. {missing[0]}")
    seen = {}
    for f in src.files:
        other = seen.setdefault(image_key(f), f)
        if other != f:
            raise ValueError(f"{other} and {f} in {src.path} share the name {image_key(f)!r}; later steps pair "
                             f"files by name without extension, so keep one of them")
    return src, manifest, labels


def _blocks(arrays, sizes: list[int]):
    """Consecutive blocks of the given row counts from a stream of (B, ...) arrays (a batch may
    straddle two blocks)."""
    pending, filled, sizes = [], 0, list(sizes)
    for out in arrays:
        pending.append(out)
        filled += len(out)
        while sizes and filled >= sizes[0]:
            block = np.concatenate(pending, axis=0)
            yield block[:sizes[0]]
            pending, filled = [block[sizes[0]:]], filled - sizes[0]
            sizes.pop(0)


def _shard_plan(keys: list[str], shard_size: int, rank: int, world: int, folder: str, kind: str):
    """The sharded layout's sample order (the per-file layout's), and this rank's unwritten shards
    with their row counts."""
    order = sample_order(keys)
    num_shards = (len(keys) + shard_size - 1) // shard_size
    todo = [k for k in range(rank, num_shards, world) if not shard_done(folder, k, kind)]
    sizes = [min(shard_size, len(keys) - k * shard_size) for k in todo]
    return order, num_shards, todo, sizes


#################################################################################
#                                   encode                                       #
#################################################################################

def encode(source: str, dest: str, model_url: str = "stabilityai/sd-vae-ft-mse", batch_size: int = 64,
           workers: int = 4, device: str | None = None, shard_size: int | None = None) -> dict:
    """Images -> one float32 (2C, h, w) [mean, std] .npy per image (same relative name), labels kept;
    with shard_size, the sharded layout instead (data_shards.py: shard-XXXXXX.npy of shard_size samples)."""
    from models.autoencoder import Autoencoder

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    src, src_manifest, labels = _open_source_for_step(source)
    _check_not_inside(dest, src)
    ranks = Procs(device)
    try:
        params = {"source": src.path, "source_fingerprint": src.fingerprint(), "model_url": model_url}
        if shard_size:
            params.update(layout=LAYOUT, shard_size=shard_size)
        status = start_step(ranks, dest, "latents", params)
        if status == "complete":
            return {"status": status, "written": 0, "rank": ranks.rank, "world": ranks.world_size}
        resolution = _source_resolution(src, src_manifest)
        with ranks.main_first():        # a download (Hugging Face) once per node, then the others read it
            ae = Autoencoder.from_spec(model_url, device=ranks.device)
        if resolution % ae.downsample:
            raise ValueError(f"image size {resolution} is not divisible by the autoencoder's factor {ae.downsample}")
        ranks.barrier()                 # every rank has checked --dest before rank 0 writes to it
        if ranks.rank == 0:
            open_step(dest, "latents", params)
        ranks.barrier()

        num_classes = (src_manifest or {}).get("num_classes") or max(labels[f] for f in src.files) + 1
        facts = {"autoencoder": ae.spec, "codec": ae.identity, "scale": ae.scale, "bias": ae.bias,
                 "latent_channels": ae.latent_channels, "downsample": ae.downsample, "dtype": "float32",
                 "resolution": resolution, "num_classes": int(num_classes)}
        if shard_size:
            return _encode_shards(src, dest, ae, ranks, params, facts, labels, shard_size, batch_size, workers,
                                  resolution, status)
        outputs = [image_key(f) + ".npy" for f in src.files]
        mine = [i for i in range(ranks.rank, len(src.files), ranks.world_size)
                if not os.path.isfile(os.path.join(dest, outputs[i]))]
        rels = [src.files[i] for i in mine]
        written = 0
        with tqdm(total=len(mine), desc=f"encode[{ranks.rank}]", unit="img", disable=ranks.rank != 0) as bar:
            for pos, images in _batches(src, rels, batch_size, workers, ranks.device, resolution):
                x = images.to(ranks.device, non_blocking=True)                     # (B, 3, R, R) uint8
                moments = ae.encode_moments(x).cpu().numpy()                     # (B, 2C, h, w) float32
                for p, m in zip(pos, moments):
                    atomic_write_bytes(os.path.join(dest, outputs[mine[p]]), npy_bytes(m))
                written += len(pos)
                bar.update(len(pos))
        ranks.barrier()

        if ranks.rank == 0:
            missing = [o for o in outputs if not os.path.isfile(os.path.join(dest, o))]
            if missing:
                raise ValueError(f"{len(missing)} latent files missing after encoding (e.g. {missing[0]}); a rank "
                                 f"failed? rerun the same command")
            moments_shape = list(np.load(os.path.join(dest, outputs[0]), mmap_mode="r").shape)
            atomic_write_json(os.path.join(dest, LABELS),
                              {"labels": [[o, labels[f]] for o, f in zip(outputs, src.files)]})
            finish_step(dest, {
                "kind": "latents", "format": FORMAT_VERSION, "params": params,
                # the codec's canonical spec (local paths absolute): training rebuilds it from any cwd,
                # and its identity (family, variant, source, ...): models.autoencoder.decoder_for reads it
                "autoencoder": ae.spec, "codec": ae.identity,
                "scale": ae.scale, "bias": ae.bias, "latent_channels": ae.latent_channels,
                "downsample": ae.downsample, "moments_shape": moments_shape, "dtype": "float32",
                "resolution": resolution, "num_files": len(outputs), "num_classes": int(num_classes)})
        ranks.barrier()
        return {"status": status, "written": written, "rank": ranks.rank, "world": ranks.world_size}
    finally:
        ranks.close()


def _encode_shards(src, dest, ae, ranks, params, facts, labels, shard_size, batch_size, workers, resolution,
                   status) -> dict:
    """encode --shard-size: each rank encodes its unwritten shards; rank 0 writes index and manifest."""
    keys = [image_key(f) for f in src.files]
    order, num_shards, todo, sizes = _shard_plan(keys, shard_size, ranks.rank, ranks.world_size, dest, "latents")
    rels = [src.files[order[i]] for k in todo for i in range(k * shard_size, min(len(keys), (k + 1) * shard_size))]

    def moments():
        with tqdm(total=len(rels), desc=f"encode[{ranks.rank}]", unit="img", disable=ranks.rank != 0) as bar:
            for pos, images in _batches(src, rels, batch_size, workers, ranks.device, resolution):
                yield ae.encode_moments(images.to(ranks.device, non_blocking=True)).cpu().numpy()  # (B, 2C, h, w)
                bar.update(len(pos))

    for k, block in zip(todo, _blocks(moments(), sizes)):
        write_shard(dest, k, "latents", array_shard_bytes(block))
    ranks.barrier()
    if ranks.rank == 0:
        first = np.load(os.path.join(dest, shard_name(0, "latents")), mmap_mode="r")
        keys_o = [keys[i] for i in order]
        labels_o = np.array([labels[src.files[i]] for i in order], np.int64)
        manifest = finish_shards(dest, "latents", len(keys), shard_size, keys_o, labels_o,
                                 {"kind": "latents", "format": FORMAT_VERSION, "params": params, **facts,
                                  "moments_shape": list(first.shape[1:]), "num_files": len(keys)})
        finish_step(dest, manifest)
        remove_records(dest, "latents", num_shards)
    ranks.barrier()
    return {"status": status, "written_shards": len(todo), "rank": ranks.rank, "world": ranks.world_size}


#################################################################################
#                                  fit-pca                                       #
#################################################################################

def fit_pca(source: str, dest: str, factor: int = 8, channels: int = 4, max_images: int | None = None,
            batch_size: int = 256, workers: int = 0) -> dict:
    """Images -> a ``pca:FILE`` codec (models/autoencoder.py); reused if already fitted alike."""
    from models.autoencoder import fit_patch_pca

    src, _, _ = _open_source_for_step(source)
    _check_not_inside(dest, src)
    files = src.files[:max_images] if max_images else src.files
    params = {"source": src.path, "source_fingerprint": src.fingerprint(), "factor": int(factor),
              "channels": int(channels), "num_images": len(files)}
    if os.path.exists(dest):
        try:
            old = torch.load(dest, map_location="cpu", weights_only=True).get("params")
        except Exception:  # noqa: BLE001 - any unreadable file is reported the same way
            old = None
        if old == params:
            return {"status": "complete", "written": 0}
        why = _diff(old, params) if isinstance(old, dict) else " (not a fit-pca file)"
        raise ValueError(f"{dest} exists but was fitted with other settings or data{why}; "
                         f"delete it or choose another --dest")

    def batches():
        with tqdm(total=len(files), desc="fit-pca", unit="img") as bar:
            for pos, images in _batches(src, files, batch_size, workers, torch.device("cpu")):
                yield images
                bar.update(len(pos))

    state = fit_patch_pca(batches(), factor, channels)
    state["params"] = params
    atomic_torch_save(state, dest)
    return {"status": "written", "written": 1, "explained_variance": round(state["explained_variance"], 5),
            "scale": round(state["scale"], 5)}


#################################################################################
#                               cache-features                                   #
#################################################################################

FEATURES_FORMAT = 3      # 2: encoder record (family, preprocessing, token rules), weights record, storage dtype;
                         # 3: checksums (crc32 of each chunk file and of each row)


def sums_name(c: int) -> str:
    """A chunk's checksums while its step runs, written just before the chunk; gathered into the manifest."""
    return f"chunk-{c:06d}.{CHECKSUM}.json"


def write_chunk(dest: str, c: int, block: np.ndarray) -> None:
    """One chunk file, its checksums first (a chunk that exists always has them)."""
    data = npy_bytes(block)
    atomic_write_json(os.path.join(dest, sums_name(c)), {"file": zlib.crc32(data), "rows": row_checksums(block)})
    atomic_write_bytes(os.path.join(dest, chunk_name(c)), data)


def gather_checksums(dest: str, num_chunks: int) -> dict:
    """The manifest's checksums from the chunks' own files (removed after the manifest is written). A chunk
    without them (written by a version before checksums, in a step resumed now) is read to compute them."""
    files, rows = [], []
    for c in range(num_chunks):
        path = os.path.join(dest, sums_name(c))
        if os.path.isfile(path):
            sums = read_json(path)
        else:
            chunk = os.path.join(dest, chunk_name(c))
            sums = {"file": file_checksum(chunk), "rows": row_checksums(np.load(chunk, mmap_mode="r"))}
        files.append(int(sums["file"]))
        rows.extend(int(r) for r in sums["rows"])
    return {"algorithm": CHECKSUM, "chunks": files, "rows": rows}


def restore_checksums(dest: str, manifest: dict) -> None:
    """Before a finished cache is reopened for repair: its kept chunks' checksums back to their own files."""
    sums = manifest.get("checksums")
    if not sums:
        return
    size = int(manifest["chunk_size"])
    for c, crc in enumerate(sums["chunks"]):
        if os.path.isfile(os.path.join(dest, chunk_name(c))):
            atomic_write_json(os.path.join(dest, sums_name(c)), {"file": crc, "rows": sums["rows"][c * size:(c + 1) * size]})
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}   # the same, cast on the device


def cache_features(source: str, enc_type: str, kind: str = "full", dest: str | None = None,
                   batch_size: int = 64, chunk_size: int | None = None, workers: int = 4,
                   device: str | None = None, enc_weights: str | None = None, precision: str = "fp16",
                   dtype: str = "float16", shard_size: int | None = None) -> dict:
    """Images -> encoder outputs in chunks of chunk_size images, in sorted image-name order; with
    shard_size, the sharded layout instead (data_shards.py), in the sharded latents' sample order.

    kind 'cls': (n, Z) global tokens; kind 'full': (n, 1 + T, Z) global + patch tokens.
    dtype: how they are stored (float16, as before, or float32). precision: fp16 autocast on GPU.
    The manifest records the encoder (name, family, preprocessing, token rules) and where its
    weights came from (path and sha256); rerunning into the folder with anything else is refused.
    """
    from models.encoders import encoder_record, load_encoders, parse_enc_types, weights_record

    names = parse_enc_types(enc_type)
    if len(names) != 1:
        raise ValueError(f"cache-features takes one encoder per run, got {enc_type!r}; run it once per encoder")
    enc_type = names[0]
    if kind not in ("cls", "full"):
        raise ValueError(f"--kind must be 'cls' or 'full', got {kind!r}")
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"--precision must be fp16 or fp32, got {precision!r}")
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"--dtype must be float16 or float32, got {dtype!r}")
    chunk_size = chunk_size or (1024 if kind == "cls" else 64)
    if batch_size <= 0 or chunk_size <= 0:
        raise ValueError("--batch-size and --chunk-size must be positive")
    src, src_manifest, _ = _open_source_for_step(source)
    if src.is_zip:
        raise ValueError("cache-features reads an images folder, not a zip; unpack it next to the latents first")
    dest = dest or os.path.join(os.path.dirname(src.path), features_dir_name(enc_type, kind))
    _check_not_inside(dest, src)
    ranks = Procs(device)
    try:
        resolution = _source_resolution(src, src_manifest)
        record = encoder_record(enc_type, resolution)
        weights = weights_record(enc_type, enc_weights)       # one-line error when they cannot be found
        params = {"source": src.path, "source_fingerprint": src.fingerprint(), "encoder": enc_type, "kind": kind,
                  "chunk_size": chunk_size, "precision": precision, "dtype": dtype, "resolution": resolution,
                  "preprocessing": record["preprocessing"], "weights_sha256": weights.get("sha256"),
                  "weights": weights.get("path") or weights.get("model") or weights.get("source")}
        if shard_size:
            params.update(layout=LAYOUT, shard_size=shard_size, chunk_size=None)
        status = start_step(ranks, dest, "features", params)
        if status == "complete":
            return {"status": status, "written_chunks": 0, "dest": dest}
        local = {enc_type: enc_weights} if enc_weights else None
        with ranks.main_first():        # a download (torch.hub) once per node, then the others read it
            encoder = load_encoders([enc_type], resolution, ranks.device, local_paths=local)[0]
        ranks.barrier()                 # every rank has checked --dest before rank 0 writes to it
        if ranks.rank == 0:
            open_step(dest, "features", params)
        ranks.barrier()
        facts = {"kind": "features", "format": FORMAT_VERSION, "features_format": FEATURES_FORMAT,
                 "params": params, "encoder": enc_type, "family": record["family"], "encoder_record": record,
                 "weights": weights, "feature_kind": kind, "embed_dim": encoder.embed_dim,
                 "num_tokens": encoder.num_tokens, "dtype": dtype, "resolution": resolution,
                 "item_shape": [encoder.embed_dim] if kind == "cls" else [encoder.num_tokens, encoder.embed_dim]}
        if shard_size:
            return _features_shards(src, dest, encoder, ranks, facts, shard_size, batch_size, workers, status)
        return _features_chunks(src, dest, encoder, ranks, facts, chunk_size, batch_size, workers, status)
    finally:
        ranks.close()


def verify_cache(dest: str) -> dict:
    """Every chunk of a finished feature cache against its recorded crc32 (one sequential read of the
    cache); damaged or missing chunks are removed and the step reopened, so that rerunning its
    cache-features command redoes just those."""
    manifest = read_json(os.path.join(dest, MANIFEST)) if os.path.isfile(os.path.join(dest, MANIFEST)) else None
    if manifest is None or manifest.get("kind") != "features":
        raise ValueError(f"{dest} is not a finished feature cache (no features manifest.json)")
    if not manifest.get("checksums"):
        raise ValueError(f"{dest} records no checksums (written before they were); cache-features into a new "
                         f"folder to have them")
    start, nbytes, bad = time.perf_counter(), 0, damaged_outputs(dest, "features", manifest)
    for c, crc in enumerate(tqdm(manifest["checksums"]["chunks"], desc="verify", unit="chunk")):
        path = os.path.join(dest, chunk_name(c))
        if path in bad:
            continue
        if file_checksum(path) != crc:
            bad.append(path)
        nbytes += os.path.getsize(path)
    seconds = time.perf_counter() - start
    status = reopen_if_damaged(dest, "features", manifest["params"], bad) if bad else "verified"
    if bad:
        print(f"{dest}: rerun cache-features with its settings (--source {manifest['params']['source']}) to redo "
              f"them", file=sys.stderr)
    return {"status": status, "damaged": len(bad), "chunks": manifest["num_chunks"],
            "MB_per_s": round(nbytes / max(seconds, 1e-9) / 1e6)}


#################################################################################
#                          pack / verify-shards                                  #
#################################################################################

class _ShardBuilder(torch.utils.data.Dataset):
    """Shard k's bytes (and, for images, the PNG ends) built in a DataLoader worker."""

    def __init__(self, ds, kind: str, todo: list[int], shard_size: int, feature: tuple | None = None):
        self.ds, self.kind, self.todo, self.size, self.feature = ds, kind, todo, shard_size, feature

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        k = self.todo[j]
        idx = range(k * self.size, min(len(self.ds), (k + 1) * self.size))
        if self.kind == "images":
            blobs = []
            for i in idx:
                with open(self.ds.image_path(i), "rb") as f:
                    blobs.append(f.read())                                  # the PNG bytes, unchanged
            return k, b"".join(blobs), np.cumsum([len(b) for b in blobs]).tolist()
        if self.kind == "latents":
            rows = [self.ds[i]["moments"].numpy() for i in idx]             # (2C, h, w) float32 each
        else:
            field = "enc_tokens" if self.feature == "full" else "enc_cls"
            rows = [self.ds[i][field][0].numpy() for i in idx]              # (1 + T, Z) or (Z,)
        return k, array_shard_bytes(np.stack(rows)), None


def _write_sharded_step(folder: str, kind: str, ds, params: dict, manifest: dict, keys: list[str],
                        shard_size: int, workers: int, feature: str | None = None) -> str:
    """One sharded step folder from a per-file dataset view; resumable per shard."""
    status = open_step(folder, kind, params)
    if status == "complete":
        status = reopen_if_damaged(folder, kind, params)
        if status == "complete":
            return status
    remove_stale_temp_files(folder, recursive=False)
    num_shards = (len(ds) + shard_size - 1) // shard_size
    todo = [k for k in range(num_shards) if not shard_done(folder, k, kind)]
    loader = torch.utils.data.DataLoader(_ShardBuilder(ds, kind, todo, shard_size, feature), batch_size=None,
                                         num_workers=workers)
    for k, data, ends in tqdm(loader, total=len(todo), desc=f"pack {os.path.basename(folder)}", unit="shard"):
        write_shard(folder, k, kind, data, {"ends": ends} if ends is not None else None)
    labels = ds.labels if kind == "latents" else None
    finish_step(folder, finish_shards(folder, kind, len(ds), shard_size, keys, labels, {**manifest, "params": params}))
    remove_records(folder, kind, num_shards)
    return status


def pack(source: str, dest: str, shard_size: int = DEFAULT_SHARD_SIZE, images: str = "auto",
         workers: int = 0) -> dict:
    """A per-file data dir (ours or the release's) -> the sharded layout: latents + labels, the images
    (when there are any, or images='yes'), and every feature cache, sample i in shard i // shard_size."""
    from dataset import REGDataset, read_manifest
    from data_shards import is_sharded

    if is_sharded(source):
        raise ValueError(f"--source {source} is already sharded")
    if os.path.abspath(dest) == os.path.abspath(source):
        raise ValueError("--dest must be another folder than --source")
    latents = REGDataset(source, use_features=False, load_images=False)
    keys = [latents.key(i) for i in range(len(latents))]
    with_images = None
    if images != "no":
        try:
            with_images = REGDataset(source, use_features=False, load_images=True)
        except FileNotFoundError:
            if images == "yes":
                raise
    resolution = with_images.resolution if with_images is not None else latents.resolution
    base = {"source": os.path.abspath(source), "shard_size": shard_size, "layout": LAYOUT}
    done = {}
    lat_manifest = read_manifest(latents.latents_dir) or {}
    done[LATENTS_DIR] = _write_sharded_step(
        os.path.join(dest, LATENTS_DIR), "latents", latents, {**base, "step": "latents"},
        {"kind": "latents", "format": FORMAT_VERSION, "autoencoder": latents.autoencoder_spec,
         "codec": latents.codec_identity, "scale": latents.latent_scale, "bias": latents.latent_bias,
         "latent_channels": latents.latent_channels, "downsample": lat_manifest.get("downsample"),
         "moments_shape": list(latents.moments_shape), "dtype": "float32", "resolution": resolution,
         "num_classes": latents.num_classes, "packed_from": latents.latents_dir}, keys, shard_size, workers)
    if with_images is not None:
        done[IMAGES_DIR] = _write_sharded_step(
            os.path.join(dest, IMAGES_DIR), "images", with_images, {**base, "step": "images"},
            {"kind": "images", "format": FORMAT_VERSION, "resolution": resolution,
             "packed_from": with_images.images_dir}, keys, shard_size, workers)
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        m = read_manifest(entry.path) if entry.is_dir() else None
        if m is None or m.get("kind") != "features":
            continue
        ds = REGDataset(source, use_features=m["feature_kind"], enc_types=[m["encoder"]], load_images=False)
        if ds.feature_records[ds.enc_types[0]]["path"] != entry.path:
            continue                      # the cls cache of an encoder that also has a full one: no such view
        keep = {k: v for k, v in m.items() if k not in ("keys", "chunk_size", "num_chunks", "params", "num_images")}
        done[entry.name] = _write_sharded_step(
            os.path.join(dest, entry.name), "features", ds, {**base, "step": entry.name},
            {**keep, "packed_from": entry.path}, keys, shard_size, workers, feature=m["feature_kind"])
    return {"status": "complete" if all(v == "complete" for v in done.values()) else "written",
            "steps": ",".join(done), "samples": len(keys)}


def verify_sharded(data_dir: str, delete: bool = False) -> dict:
    """Every shard of every sharded step checked against its recorded size and sha256."""
    from data_shards import sharded_steps

    steps = sharded_steps(data_dir)
    if steps is None:
        raise ValueError(f"no sharded steps in {data_dir}")
    bad = [p for kind in steps for folder, _ in steps[kind] for p in verify_shards(folder)]
    for p in bad:
        print(f"damaged: {p}", file=sys.stderr)
        if delete:
            os.remove(p)
    if bad and not delete:
        raise ValueError(f"{len(bad)} damaged shard(s), e.g. {bad[0]}: rerun with --delete, then rerun the "
                         f"command that wrote them (pack, encode --shards or cache-features --shards)")
    return {"status": "checked", "damaged": len(bad)}


def _encoder_outputs(src, rels, encoder, ranks, facts, batch_size, workers):
    """The stored encoder outputs of the images ``rels``, in order: a stream of (B, Z) or (B, 1 + T, Z)
    arrays in the storage dtype (cast on the device: half the bytes to copy for float16)."""
    autocast = torch.autocast(ranks.device.type, dtype=torch.float16,
                              enabled=facts["params"]["precision"] == "fp16" and ranks.device.type == "cuda")
    with tqdm(total=len(rels), desc=f"features[{ranks.rank}]", unit="img", disable=ranks.rank != 0) as bar:
        for pos, images in _batches(src, rels, batch_size, workers, ranks.device, facts["resolution"]):
            with autocast:
                cls, tokens = encoder(images.to(ranks.device, non_blocking=True))   # (B, Z), (B, 1 + T, Z)
            out = cls if facts["feature_kind"] == "cls" else tokens
            yield out.to(TORCH_DTYPES[facts["dtype"]]).cpu().numpy()
            bar.update(len(pos))


def _features_chunks(src, dest, encoder, ranks, facts, chunk_size, batch_size, workers, status) -> dict:
    """cache-features: chunks of chunk_size images in sorted image-name order; each rank computes its
    unwritten chunks, rank 0 gathers their checksums into the manifest."""
    keys = [image_key(f) for f in src.files]
    num_chunks = (len(keys) + chunk_size - 1) // chunk_size
    bounds = [(c * chunk_size, min(len(keys), (c + 1) * chunk_size)) for c in range(num_chunks)]
    todo = [c for c in range(ranks.rank, num_chunks, ranks.world_size)
            if not os.path.isfile(os.path.join(dest, chunk_name(c)))]
    rels = [src.files[i] for c in todo for i in range(*bounds[c])]
    stream = _encoder_outputs(src, rels, encoder, ranks, facts, batch_size, workers)
    for block, c in zip(_blocks(stream, [bounds[c][1] - bounds[c][0] for c in todo]), todo):
        write_chunk(dest, c, block)
    ranks.barrier()
    if ranks.rank == 0:
        missing = [c for c in range(num_chunks) if not os.path.isfile(os.path.join(dest, chunk_name(c)))]
        if missing:
            raise ValueError(f"{len(missing)} feature chunks missing (e.g. {chunk_name(missing[0])}); a rank "
                             f"failed? rerun the same command")
        finish_step(dest, {**facts, "chunk_size": chunk_size, "num_chunks": num_chunks, "num_images": len(keys),
                           "keys": keys, "checksums": gather_checksums(dest, num_chunks)})
        for c in range(num_chunks):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(dest, sums_name(c)))
    ranks.barrier()
    return {"status": status, "written_chunks": len(todo), "dest": dest}


def _features_shards(src, dest, encoder, ranks, facts, shard_size, batch_size, workers, status) -> dict:
    """cache-features --shards: each rank computes its unwritten shards; rank 0 writes the manifest."""
    keys = [image_key(f) for f in src.files]
    order, num_shards, todo, sizes = _shard_plan(keys, shard_size, ranks.rank, ranks.world_size, dest, "features")
    rels = [src.files[order[i]] for k in todo for i in range(k * shard_size, min(len(keys), (k + 1) * shard_size))]
    stream = _encoder_outputs(src, rels, encoder, ranks, facts, batch_size, workers)
    for block, k in zip(_blocks(stream, sizes), todo):
        write_shard(dest, k, "features", array_shard_bytes(block))
    ranks.barrier()
    if ranks.rank == 0:
        finish_step(dest, finish_shards(dest, "features", len(keys), shard_size, [keys[i] for i in order], None,
                                        facts))
        remove_records(dest, "features", num_shards)
    ranks.barrier()
    return {"status": status, "written_shards": len(todo), "dest": dest}


#################################################################################
#                                      CLI                                       #
#################################################################################

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def parse_resolution(s: str) -> int:
    """'256x256' (or '256') -> 256; non-square sizes are refused."""
    parts = s.lower().replace(",", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        w = h = None
    if w is None:
        raise argparse.ArgumentTypeError(f"expected WxH like 256x256, got {s!r}")
    if w != h:
        raise argparse.ArgumentTypeError(f"only square outputs are supported, got {s!r}")
    return w


def _enc_type(s: str) -> str:
    from models.encoders import parse_enc_types
    try:
        names = parse_enc_types(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"one encoder per run, got {s!r}")
    return names[0]


def build_parser() -> argparse.ArgumentParser:
    p = RankZeroParser(prog="dataset_tools.py",
                       description="Preprocess an image dataset for REG training (see preprocessing/README.md).")
    sub = p.add_subparsers(dest="command", required=True)
    cpu_workers = min(8, os.cpu_count() or 1)

    c = sub.add_parser("convert", help="raw images -> square uncompressed PNGs + labels")
    c.add_argument("--source", required=True, help="image folder (one sub-folder per class, or with dataset.json) or .zip")
    c.add_argument("--dest", required=True, help="output folder (e.g. DATA/images) or .zip")
    c.add_argument("--resolution", required=True, type=parse_resolution, help="output size, e.g. 256x256")
    c.add_argument("--transform", default="center-crop-dhariwal", choices=TRANSFORMS,
                   help="center-crop-dhariwal = ADM's ImageNet crop (default); none = images already at size")
    c.add_argument("--max-images", type=_positive_int, default=None, help="only the first N images (sorted)")
    c.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of stopping at the first one")
    c.add_argument("--workers", type=_nonneg_int, default=cpu_workers, help="decode processes (0 = in-process)")
    c.set_defaults(_run=lambda a: convert(a.source, a.dest, a.resolution, a.transform, a.max_images,
                                          a.skip_bad_images, a.workers), _parser=c)

    e = sub.add_parser("encode", help="PNG folder -> VAE latent [mean, std] per image")
    e.add_argument("--source", required=True, help="images folder from convert (or the release's)")
    e.add_argument("--dest", required=True, help="output folder, e.g. DATA/vae-latents")
    e.add_argument("--model-url", default="stabilityai/sd-vae-ft-mse",
                   help="VAE: Hugging Face id, 'mse'/'ema', local diffusers dir or file, 'pca:FILE' (from "
                        "fit-pca), 'identity', 'random-tiny' (tests). Env REG_VAE_PATH may point at a local copy")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--workers", type=_nonneg_int, default=4, help="DataLoader workers per process")
    e.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    e.add_argument("--shards", action="store_true",
                   help="write the sharded layout (one .npy per --shard-size samples) instead of one file per image")
    e.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    e.set_defaults(_run=lambda a: encode(a.source, a.dest, a.model_url, a.batch_size, a.workers, a.device,
                                         a.shard_size if a.shards else None), _parser=e)

    q = sub.add_parser("fit-pca", help="PNG folder -> linear patch codec file (VAE stand-in for the CPU demo)")
    q.add_argument("--source", required=True, help="images folder from convert")
    q.add_argument("--dest", required=True, help="output file, e.g. DATA/pca-f8c4.pt; then encode --model-url pca:FILE")
    q.add_argument("--factor", type=_positive_int, default=8, help="patch size = downsampling factor (SD-VAE: 8)")
    q.add_argument("--channels", type=_positive_int, default=4, help="latent channels kept (SD-VAE: 4)")
    q.add_argument("--max-images", type=_positive_int, default=None, help="fit on the first N images (sorted)")
    q.add_argument("--batch-size", type=_positive_int, default=256)
    q.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader workers")
    q.set_defaults(_run=lambda a: fit_pca(a.source, a.dest, a.factor, a.channels, a.max_images, a.batch_size,
                                          a.workers), _parser=q)

    f = sub.add_parser("cache-features", help="PNG folder -> encoder outputs (global token or all tokens)")
    f.add_argument("--source", required=True, help="images folder from convert")
    f.add_argument("--enc-type", required=True, type=_enc_type,
                   help="one encoder, e.g. dinov2-vit-b, clip-vit-L, mocov3-vit-b, mae-vit-l, jepa-vit-h")
    f.add_argument("--kind", default="full", choices=("cls", "full"),
                   help="cls: global (class) token only (small); full: global + patch tokens (default)")
    f.add_argument("--dest", default=None, help="default: features-<enc>-<kind>/ next to --source")
    f.add_argument("--enc-weights", default=None,
                   help="the encoder's weights file in its published layout, or a folder holding it (DINOv2: "
                        "also a dinov2 clone); else the family's env variable (REG_DINOV2_WEIGHTS, "
                        "REG_CLIP_WEIGHTS, REG_MOCOV3_WEIGHTS, REG_MAE_WEIGHTS, REG_DINOV1_WEIGHTS, "
                        "REG_JEPA_WEIGHTS); DINOv2 falls back to REG_DINOV2_REPO / torch.hub")
    f.add_argument("--batch-size", type=_positive_int, default=64)
    f.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="images per output file (default 1024 for cls, 64 for full)")
    f.add_argument("--workers", type=_nonneg_int, default=4, help="DataLoader workers per process")
    f.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    f.add_argument("--precision", default="fp16", choices=("fp16", "fp32"),
                   help="autocast dtype on GPU (as the release's fp16 training); CPU runs fp32")
    f.add_argument("--dtype", default="float16", choices=tuple(FEATURE_DTYPES),
                   help="how the outputs are stored (float16, the default, halves the size: ~2e-4 relative rounding)")
    f.add_argument("--shards", action="store_true",
                   help="write the sharded layout (give --dest inside the sharded data dir, with the latents' "
                        "--shard-size)")
    f.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    f.set_defaults(_run=lambda a: cache_features(a.source, a.enc_type, a.kind, a.dest, a.batch_size, a.chunk_size,
                                                 a.workers, a.device, a.enc_weights, a.precision, a.dtype,
                                                 a.shard_size if a.shards else None), _parser=f)
    v = sub.add_parser("verify", help="check every chunk of a feature cache against its checksum (a full read)")
    v.add_argument("dest", help="the feature cache folder, e.g. DATA/features-dinov2-vit-b-full")
    v.set_defaults(_run=lambda a: verify_cache(a.dest), _parser=v)
    k = sub.add_parser("pack", help="per-file data dir (ours or the release's) -> sharded layout")
    k.add_argument("--source", required=True, help="data dir with latents (and images, feature caches)")
    k.add_argument("--dest", required=True, help="output data dir, e.g. DATA-shards (then --data-dir DATA-shards)")
    k.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    k.add_argument("--images", default="auto", choices=("auto", "yes", "no"),
                   help="pack the images too (auto: when the source has them; no: a full feature cache run)")
    k.add_argument("--workers", type=_nonneg_int, default=0, help="processes building shards")
    k.set_defaults(_run=lambda a: pack(a.source, a.dest, a.shard_size, a.images, a.workers), _parser=k)

    s_ = sub.add_parser("verify-shards", help="check every shard's size and sha256 against its manifest")
    s_.add_argument("--data-dir", required=True, help="a sharded data dir (local path)")
    s_.add_argument("--delete", action="store_true", help="remove damaged shards, so that a rerun rewrites them")
    s_.set_defaults(_run=lambda a: verify_sharded(a.data_dir, a.delete), _parser=s_)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        summary = args._run(args)
    except (ValueError, FileNotFoundError) as e:
        # A data or setup problem, not a usage one: the message alone, no usage block.
        args._parser.exit(2, f"{args._parser.prog}: error: {e}\n")
    if summary.get("status") == "complete":
        print(f"{args.command}: already complete, nothing to do")
    else:
        print(f"{args.command}: done ({', '.join(f'{k}={v}' for k, v in summary.items() if not isinstance(v, list))})")
    return summary


if __name__ == "__main__":
    main()
