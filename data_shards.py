"""Sharded training data: a few large files per step instead of one or two small files per sample.

A sharded data dir holds the same steps as the per-file layout (dataset.py), each in its own
folder whose ``manifest.json`` says ``"layout": "shards"``:

    DATA-shards/latents/                    kind latents: the sample list, labels, codec
        manifest.json                       written last; per shard: samples, bytes, sha256
        index-keys.npy   (N,) bytes         sample names (the per-file layout's image names)
        index-labels.npy (N,) int64
        shard-000000.npy (S, 2C, h, w) f32  samples [0, S), a plain .npy array
    DATA-shards/images/                     kind images: the PNG bytes the online encoder reads
        index-ends.npy   (N,) int64         end of sample i's PNG inside its shard
        shard-000000.bin                    the PNGs of samples [0, S), back to back
    DATA-shards/features-<enc>-<kind>/      kind features: (S, Z) or (S, 1 + T, Z) .npy shards

Sample i lives in shard i // S at row i % S of every step, in the per-file layout's order (sorted
latent file names), so index i is the same sample in both layouts and the sampler's order (a
function of seed, processes and batch) gives the same batches. Reading a sample is one byte
range per step: a positioned read on a local or shared file system, a range request through
fsspec for any URL (``file://``, ``s3://`` with s3fs, ``gs://`` with gcsfs, ...). Start-up reads
the manifests and the small index arrays (no listing, no per-sample JSON); each process keeps
at most ``MAX_OPEN`` shard handles open, whatever the dataset size.

Why no streaming library: see README.md ("Sharded data"). In short, the ones that install
lightly (LitData, WebDataset's wids) took ~7 ms per random-index read on this machine, copy
whole shards into a local cache, and LitData does not read ``file://``; MosaicML Streaming
pulls 55 packages (downgrading numpy and huggingface_hub). fsspec, already a torch dependency,
gives the remote reads.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections import OrderedDict

import numpy as np
import torch

from dataset import MANIFEST, DataFileError, REGDataset, decode_image

#################################################################################
#                                 Layout                                         #
#################################################################################

LAYOUT = "shards"
DEFAULT_SHARD_SIZE = 1024           # ImageNet 256: 32 MB of latents, ~200 MB of PNGs per shard
MAX_OPEN = 16                       # shard handles kept open per process
INDEX_KEYS, INDEX_LABELS, INDEX_ENDS = "index-keys.npy", "index-labels.npy", "index-ends.npy"
LATENTS_DIR, IMAGES_DIR = "latents", "images"


def shard_name(k: int, kind: str) -> str:
    return f"shard-{k:06d}.{'bin' if kind == 'images' else 'npy'}"


def sample_order(keys: list[str]) -> list[int]:
    """Positions of keys in the per-file layout's order (REGDataset sorts latent file names)."""
    return sorted(range(len(keys)), key=lambda i: keys[i] + ".npy")


def keys_digest(keys) -> str:
    """One hash of the sample list: steps written apart must hold the same samples in the same order."""
    h = hashlib.sha1()
    for k in keys:
        h.update((k.decode() if isinstance(k, bytes) else k).encode() + b"\n")
    return h.hexdigest()


def npy_header_len(shape, dtype) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                "shape": tuple(int(s) for s in shape)})
    return buf.tell()


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if is_url(root) else os.path.join(root, *parts)


def _fs(path: str):
    import fsspec
    return fsspec.core.url_to_fs(path)


def read_small(path: str) -> bytes:
    """A whole (small) file: manifest or index array."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_json_any(path: str) -> dict | None:
    try:
        return json.loads(read_small(path))
    except (FileNotFoundError, OSError):
        return None


def read_npy_any(path: str) -> np.ndarray:
    return np.load(io.BytesIO(read_small(path)), allow_pickle=False)


def sharded_steps(data_dir: str) -> dict[str, list] | None:
    """{kind: [(folder, manifest)]} of the sharded steps in data_dir; None if it holds none.
    One listing of data_dir's top level (a handful of folders), then one manifest read each."""
    if is_url(data_dir):
        fs, root = _fs(data_dir)
        if not fs.isdir(root):
            return None
        proto = data_dir.split("://", 1)[0]
        subdirs = sorted(f"{proto}://{e['name']}" if "://" not in e["name"] else e["name"]
                         for e in fs.ls(root, detail=True) if e["type"] == "directory")
    else:
        if not os.path.isdir(data_dir):
            return None
        subdirs = sorted(e.path for e in os.scandir(data_dir) if e.is_dir())
    steps = {"images": [], "latents": [], "features": []}
    found = False
    for d in subdirs:
        m = read_json_any(join(d, MANIFEST))
        if m is not None and m.get("layout") == LAYOUT and m.get("kind") in steps:
            steps[m["kind"]].append((d, m))
            found = True
    return steps if found else None


def is_sharded(data_dir: str) -> bool:
    return sharded_steps(str(data_dir)) is not None


#################################################################################
#                                 Writing                                        #
#################################################################################

def _sidecar(folder: str, k: int, kind: str) -> str:
    return os.path.join(folder, shard_name(k, kind) + ".json")


def shard_done(folder: str, k: int, kind: str) -> bool:
    """A shard is done when its record (written after it) exists and its size matches."""
    side, path = _sidecar(folder, k, kind), os.path.join(folder, shard_name(k, kind))
    if not (os.path.isfile(side) and os.path.isfile(path)):
        return False
    with open(side) as f:
        rec = json.load(f)
    return os.path.getsize(path) == rec["bytes"]


def write_shard(folder: str, k: int, kind: str, data: bytes, extra: dict | None = None) -> None:
    """The shard atomically, then its record (bytes, sha256, and e.g. the PNG ends) atomically: a
    kill leaves either nothing or a shard without record, which a rerun rewrites (the same bytes)."""
    from fileio import atomic_write_bytes, atomic_write_json

    atomic_write_bytes(os.path.join(folder, shard_name(k, kind)), data)
    atomic_write_json(_sidecar(folder, k, kind), {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                  **(extra or {})})


def array_shard_bytes(block: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(block), allow_pickle=False)
    return buf.getvalue()


def finish_shards(folder: str, kind: str, num_samples: int, shard_size: int, keys: list[str],
                  labels: np.ndarray | None, manifest: dict) -> dict:
    """Collect the shard records into the manifest and the index arrays; write them (manifest last)."""
    from fileio import atomic_write_bytes

    num_shards = (num_samples + shard_size - 1) // shard_size
    shards, ends = [], []
    for k in range(num_shards):
        if not shard_done(folder, k, kind):
            raise ValueError(f"shard {shard_name(k, kind)} missing in {folder}: a rank failed? rerun the same command")
        with open(_sidecar(folder, k, kind)) as f:
            rec = json.load(f)
        n = min(shard_size, num_samples - k * shard_size)
        shards.append({"name": shard_name(k, kind), "samples": n, "bytes": rec["bytes"], "sha256": rec["sha256"]})
        ends.extend(rec.get("ends", []))
    if kind == "latents":
        atomic_write_bytes(os.path.join(folder, INDEX_KEYS), array_shard_bytes(np.array([k.encode() for k in keys],
                                                                                        dtype=np.bytes_)))
        atomic_write_bytes(os.path.join(folder, INDEX_LABELS), array_shard_bytes(np.asarray(labels, np.int64)))
    if kind == "images":
        atomic_write_bytes(os.path.join(folder, INDEX_ENDS), array_shard_bytes(np.array(ends, np.int64)))
    manifest = {**manifest, "layout": LAYOUT, "num_samples": num_samples, "shard_size": shard_size,
                "num_shards": num_shards, "keys_sha1": keys_digest(keys), "shards": shards}
    return manifest


def remove_records(folder: str, kind: str, num_shards: int) -> None:
    """After the manifest holds them: the per-shard records go."""
    for k in range(num_shards):
        side = _sidecar(folder, k, kind)
        if os.path.isfile(side):
            os.remove(side)


def restore_records(folder: str, manifest: dict) -> None:
    """A finished step reopened for repair: its intact shards get their records back (done), so that a
    rerun rewrites only the damaged ones; the image ends come back from the index."""
    from fileio import atomic_write_json

    kind = manifest["kind"]
    ends = np.load(os.path.join(folder, INDEX_ENDS)) if kind == "images" else None
    size = int(manifest["shard_size"])
    for k, rec in enumerate(manifest["shards"]):
        path = os.path.join(folder, rec["name"])
        if os.path.isfile(path) and os.path.getsize(path) == rec["bytes"]:
            extra = {"ends": ends[k * size:k * size + rec["samples"]].tolist()} if ends is not None else {}
            atomic_write_json(_sidecar(folder, k, kind), {"bytes": rec["bytes"], "sha256": rec["sha256"], **extra})


def verify_shards(folder: str) -> list[str]:
    """Shards of a finished sharded step whose size or sha256 differs from the manifest's record."""
    m = read_json_any(join(folder, MANIFEST))
    if m is None or m.get("layout") != LAYOUT:
        raise ValueError(f"{folder} is not a finished sharded step (no manifest with layout 'shards')")
    bad = []
    for rec in m["shards"]:
        path = join(folder, rec["name"])
        try:
            data = read_small(path)
        except OSError:
            bad.append(path)
            continue
        if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
            bad.append(path)
    return bad


#################################################################################
#                                 Reading                                        #
#################################################################################

class ShardFiles:
    """Byte ranges of shard files, local (positioned reads) or any fsspec URL (range reads), with at
    most ``max_open`` handles open (least recently used closed first). ``opened`` counts opens."""

    def __init__(self, max_open: int = MAX_OPEN):
        self.max_open, self.opened, self._pid = max_open, 0, os.getpid()
        self._handles: OrderedDict[str, object] = OrderedDict()

    def _handle(self, path: str):
        if self._pid != os.getpid():    # a forked worker: the parent's handles share its file offsets
            self._handles, self._pid = OrderedDict(), os.getpid()
        f = self._handles.get(path)
        if f is not None:
            self._handles.move_to_end(path)
            return f
        if is_url(path):
            fs, p = _fs(path)
            local = type(fs).__name__.startswith("Local")
            f = fs.open(p, "rb") if local else fs.open(p, "rb", cache_type="none")   # one request per read
        else:
            f = open(path, "rb", buffering=0)
        self.opened += 1
        self._handles[path] = f
        while len(self._handles) > self.max_open:
            self._handles.popitem(last=False)[1].close()
        return f

    def read(self, path: str, start: int, length: int) -> bytes:
        f = self._handle(path)
        if hasattr(f, "fileno") and not is_url(path):
            data = os.pread(f.fileno(), length, start)
        else:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise EOFError(f"read {len(data)} of {length} bytes at offset {start}: the file is cut short")
        return data

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()


def open_dataset(data_dir, **kwargs) -> REGDataset:
    """The training data in ``data_dir``, whichever layout: a ShardedDataset for sharded steps (a
    local path or a URL), else a REGDataset (our per-file layout and the releases')."""
    return (ShardedDataset if is_sharded(str(data_dir)) else REGDataset)(str(data_dir), **kwargs)


class ShardedDataset(REGDataset):
    """REGDataset over a sharded data dir (a local path or a URL): the same items, attributes and
    errors, the same sample i as the per-file layout it was packed from (``open_dataset`` picks it
    when data_dir holds sharded steps)."""

    def __init__(self, data_dir: str, use_features: bool | str = "auto", enc_types: list[str] | None = None,
                 load_images: bool | None = None, images_dir: str | None = None,
                 latents_dir: str | None = None, encoder_weights: dict | None = None, skip_bad: bool = False,
                 allow_partial: bool = False):
        # allow_partial: the index and the shards are written from one list, so their counts agree by
        # construction (a shard cut short is damage, named when read)
        data_dir = str(data_dir)
        steps = sharded_steps(data_dir)
        if steps is None:
            raise FileNotFoundError(f"no sharded data in {data_dir}: pack it with preprocessing/dataset_tools.py pack")
        enc_types = self._start(data_dir, use_features, enc_types, encoder_weights, skip_bad)
        self._mmaps, self._files = {}, ShardFiles()

        # ---- latents: the sample list, labels and codec
        lat = self._pick_step(steps, "latents", latents_dir)
        self.latents_dir, m = lat
        self._lat_manifest = m
        self.shard_size, self.num_shards = int(m["shard_size"]), int(m["num_shards"])
        self._keys = read_npy_any(join(self.latents_dir, INDEX_KEYS))
        self.labels = read_npy_any(join(self.latents_dir, INDEX_LABELS)).astype(np.int64, copy=False)
        if len(self._keys) != m["num_samples"] or len(self.labels) != m["num_samples"]:
            raise ValueError(f"the index of {self.latents_dir} lists {len(self._keys)} samples, its manifest "
                             f"{m['num_samples']}: rerun pack")
        self.moments_shape = tuple(int(s) for s in m["moments_shape"])
        self.latent_shape = self.moments_shape
        self.latent_channels = self.moments_shape[0] // 2
        self.autoencoder_spec, self.codec_identity = m["autoencoder"], m["codec"]
        self.latent_scale, self.latent_bias = float(m["scale"]), float(m["bias"])
        self.num_classes, self.resolution = int(m["num_classes"]), int(m["resolution"])
        digest = m["keys_sha1"]

        # ---- features: the encoder choice and cache checks are REGDataset's
        self._features = []
        for _, fm in steps["features"]:
            self._check_aligned(fm, digest, "features")
        self.feature_kind = self._choose_features(steps, use_features, enc_types)
        self.enc_types = [name for name, _, _ in self._features]
        self.encoder_widths = {name: int(fm["embed_dim"]) for name, _, fm in self._features}
        self.feature_records = {name: {"path": d, "kind": fm["feature_kind"], "dtype": fm.get("dtype", "float16"),
                                       "encoder_record": fm.get("encoder_record"), "weights": fm.get("weights")}
                                for name, d, fm in self._features}
        for name, d, fm in self._features:
            if int(fm["resolution"]) != self.resolution:
                raise ValueError(f"features in {d} were computed at {fm['resolution']} px but the dataset is "
                                 f"{self.resolution} px")

        # ---- images
        self.load_images = (self.feature_kind != "full") if load_images is None else bool(load_images)
        self.images_dir, self._image_files, self._image_ends = None, None, None
        if self.load_images:
            self.images_dir, im = self._pick_step(steps, "images", images_dir)
            self._check_aligned(im, digest, "images")
            self._image_ends = read_npy_any(join(self.images_dir, INDEX_ENDS))

    # ------------------------------------------------------------------ discovery
    def _pick_step(self, steps, kind, override):
        found = steps[kind]
        if override is not None:
            found = [(d, m) for d, m in found if posixpath.basename(d.rstrip("/")) == override or d == override]
        if not found:
            tool = {"latents": "encode --shards", "images": "pack"}[kind]
            raise FileNotFoundError(f"no sharded {kind} in {self.data_dir}: run preprocessing/dataset_tools.py "
                                    f"pack (or {tool})")
        if len(found) > 1:
            names = ", ".join(posixpath.basename(d) for d, _ in found)
            raise ValueError(f"several sharded {kind} folders in {self.data_dir} ({names}); choose one with "
                             f"{kind}_dir=")
        return found[0]

    def _check_aligned(self, m, digest, what):
        if m.get("keys_sha1") != digest or int(m["shard_size"]) != self.shard_size:
            raise ValueError(f"the sharded {what} in {self.data_dir} hold other samples or another shard size than "
                             f"its latents ({m.get('num_samples')} vs {len(self._keys)} samples); write every step "
                             f"with the same --shard-size from the same images")

    # ------------------------------------------------------------------ reading
    def __getstate__(self):
        state = super().__getstate__()
        state["_files"] = ShardFiles()          # handles are opened lazily in each worker
        return state

    def _read(self, folder: str, kind: str, i: int, start: int, length: int, step: str) -> bytes:
        k = i // self.shard_size
        path = join(folder, shard_name(k, kind))
        try:
            return self._files.read(path, start, length)
        except (OSError, EOFError, ValueError) as e:
            raise self._bad_shard(path, i, step, e) from None

    def _bad_shard(self, path: str, i: int, step: str, error) -> DataFileError:
        text = " ".join(str(error).split()) or type(error).__name__
        return DataFileError(f"{path} is damaged at sample {i} ({self.key(i)}): {text[:160]}; it was written by "
                             f"the {step} step: rerun it (it rewrites shards that fail their checksum; "
                             f"dataset_tools.py verify-shards lists them), or train with --skip-bad-samples")

    def _rows(self, folder, kind, i, shape, dtype, rows_per_item=None, step="pack"):
        """Sample i's row of an array shard: (shape) array, read as one byte range."""
        k, r = divmod(i, self.shard_size)
        n = min(self.shard_size, len(self) - k * self.shard_size)
        item_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        full_shape = shape if rows_per_item is None else (rows_per_item, *shape)
        stride = int(np.prod(full_shape)) * np.dtype(dtype).itemsize
        start = npy_header_len((n, *full_shape), dtype) + r * stride
        data = self._read(folder, kind, i, start, item_bytes, step)
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def _item(self, i: int) -> dict:
        moments = self._rows(self.latents_dir, "latents", i, self.moments_shape, np.float32, step="encode")
        item = {"moments": torch.from_numpy(moments), "label": torch.tensor(self.labels[i])}
        if self.load_images:
            k = i // self.shard_size
            start = 0 if i == k * self.shard_size else int(self._image_ends[i - 1])
            data = self._read(self.images_dir, "images", i, start, int(self._image_ends[i]) - start, "pack")
            try:
                image = decode_image(data, f"sample {i}")                       # (3, R, R) uint8
            except (ValueError, OSError, SyntaxError) as e:
                raise self._bad_shard(join(self.images_dir, shard_name(k, "images")), i, "pack", e) from None
            if image.shape[-2:] != (self.resolution, self.resolution):
                raise ValueError(f"image {self.key(i)} is {image.shape[-1]}x{image.shape[-2]}, the dataset is "
                                 f"{self.resolution}x{self.resolution}")
            item["image"] = image
        if self._features:
            cls_list, tok_list = [], []
            for _, folder, m in self._features:
                dtype, shape = np.dtype(m.get("dtype", "float16")), tuple(m["item_shape"])
                if m["feature_kind"] == "full" and self.feature_kind != "full":
                    entry = self._rows(folder, "features", i, shape[1:], dtype, rows_per_item=shape[0],
                                       step="cache-features")                     # (Z,): the global token only
                    cls_list.append(torch.from_numpy(entry))
                    continue
                entry = torch.from_numpy(self._rows(folder, "features", i, shape, dtype, step="cache-features"))
                if self.feature_kind == "full":
                    cls_list.append(entry[0].clone())                          # (Z,)
                    tok_list.append(entry)                                     # (1 + T, Z)
                else:
                    cls_list.append(entry)                                     # (Z,)
            item["enc_cls"] = cls_list
            if self.feature_kind == "full":
                item["enc_tokens"] = tok_list
        return item
