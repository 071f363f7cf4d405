#!/usr/bin/env python
"""Per-file vs sharded training data (data_shards.py): what the loader costs, measured here.

    python benchmarks/bench_data.py                       # 512 samples at 256 px, ~2-4 min on a CPU
    python benchmarks/bench_data.py --num-samples 4096 --index-size 1281167

Prints, for the per-file layout, the sharded one (local path) and the sharded one read through
fsspec (``file://``, standing in for a bucket):
  * loader samples/s with 0, 2 and 4 workers (the training loader: ResumableSampler, batch 64,
    images + latents + labels, the online-encoder case);
  * files opened per 1,000 samples and bytes read per sample (0 workers: every ``open`` counted,
    ``rchar`` of /proc/self/io);
  * the time from start (dataset construction) to the first batch for an index of --index-size
    entries (ImageNet: 1,281,167). Simulated: the per-file layout gets its two full-size
    ``dataset.json`` files but only the files the first batch reads (rank 0 of 8, batch 32); the
    sharded one gets its full index arrays and every shard as a sparse file of the right size with
    the first batch's samples written in. Both run in a fresh process (imports not counted);
and, on paper, the read rates SiT-XL/2 and SiT-B/2 need on 8 H100s with and without a full
feature cache. The data is synthetic (noise PNGs of the real size, random latents); the files
were just written, so reads come from the page cache: a cluster file system adds its latency per
open and per request on top, which is what the opens column counts.
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

LATENT_SPEC = "stabilityai/sd-vae-ft-mse"


#################################################################################
#                              Synthetic datasets                                #
#################################################################################

def png(rng, r: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (r, r, 3), dtype=np.uint8)).save(buf, format="png", compress_level=0)
    return buf.getvalue()


def name(i: int) -> str:
    return f"{i // 1000:05d}/img{i:08d}"


def latents_manifest(n: int, r: int) -> dict:
    from models.autoencoder import SD_VAE_SCALE, codec_identity
    return {"kind": "latents", "format": 1, "params": {"source": "synthetic"}, "autoencoder": LATENT_SPEC,
            "codec": codec_identity(LATENT_SPEC), "scale": SD_VAE_SCALE, "bias": 0.0, "latent_channels": 4,
            "downsample": 8, "moments_shape": [8, r // 8, r // 8], "dtype": "float32", "resolution": r,
            "num_files": n, "num_classes": 1000}


def write_per_file(root: str, n: int, r: int, only=None, blob: bytes | None = None) -> None:
    """Our per-file layout (images/ + vae-latents/ with dataset.json and manifest); with ``only``,
    the JSONs list n entries but only those samples' files exist (the start-up simulation)."""
    from fileio import npy_bytes
    rng = np.random.default_rng(0)
    for d in ("images", "vae-latents"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in (range(n) if only is None else only):
        for d, ext, data in (("images", ".png", blob or png(rng, r)),
                             ("vae-latents", ".npy", npy_bytes(rng.standard_normal((8, r // 8, r // 8), np.float32)))):
            path = os.path.join(root, d, name(i) + ext)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    labels = [i % 1000 for i in range(n)]
    for d, ext in (("images", ".png"), ("vae-latents", ".npy")):
        with open(os.path.join(root, d, "dataset.json"), "w") as f:
            json.dump({"labels": [[name(i) + ext, c] for i, c in enumerate(labels)]}, f)
    with open(os.path.join(root, "images", "manifest.json"), "w") as f:
        json.dump({"kind": "images", "format": 1, "params": {}, "resolution": r, "num_images": n,
                   "num_classes": 1000}, f)
    with open(os.path.join(root, "vae-latents", "manifest.json"), "w") as f:
        json.dump(latents_manifest(n, r), f)


def write_sparse_shards(root: str, n: int, r: int, shard: int, needed, blob: bytes) -> None:
    """The sharded layout of n samples: full index, sparse shards with only ``needed`` written in."""
    from data_shards import INDEX_ENDS, INDEX_KEYS, INDEX_LABELS, LAYOUT, array_shard_bytes, keys_digest, \
        npy_header_len, shard_name
    keys = [name(i) for i in range(n)]
    digest = keys_digest(keys)
    num = (n + shard - 1) // shard
    row = 8 * (r // 8) ** 2 * 4
    for kind, d in (("latents", "latents"), ("images", "images")):
        os.makedirs(os.path.join(root, d), exist_ok=True)
        shards = []
        for k in range(num):
            m = min(shard, n - k * shard)
            path = os.path.join(root, d, shard_name(k, kind))
            size = npy_header_len((m, 8, r // 8, r // 8), np.float32) + m * row if kind == "latents" else m * len(blob)
            with open(path, "wb") as f:
                f.truncate(size)                                   # sparse: no blocks on disk
            shards.append({"name": shard_name(k, kind), "samples": m, "bytes": size, "sha256": "-"})
        with open(os.path.join(root, d, "manifest.json"), "w") as f:
            base = latents_manifest(n, r) if kind == "latents" else {"kind": "images", "format": 1, "resolution": r}
            json.dump({**base, "layout": LAYOUT, "num_samples": n, "shard_size": shard, "num_shards": num,
                       "keys_sha1": digest, "shards": shards}, f)
    with open(os.path.join(root, "latents", INDEX_KEYS), "wb") as f:
        f.write(array_shard_bytes(np.array([k.encode() for k in keys], dtype=np.bytes_)))
    with open(os.path.join(root, "latents", INDEX_LABELS), "wb") as f:
        f.write(array_shard_bytes(np.arange(n, dtype=np.int64) % 1000))
    ends = (np.arange(n, dtype=np.int64) % shard + 1) * len(blob)
    with open(os.path.join(root, "images", INDEX_ENDS), "wb") as f:
        f.write(array_shard_bytes(ends))
    for i in needed:                    # the first batch's PNGs (latents stay zero)
        k, j = divmod(i, shard)
        with open(os.path.join(root, "images", shard_name(k, "images")), "r+b") as f:
            f.seek(j * len(blob))
            f.write(blob)


#################################################################################
#                                 Measurements                                   #
#################################################################################

def loader(data_dir: str, batch: int, workers: int, world: int = 1):
    from data_order import ResumableSampler
    from data_shards import open_dataset
    ds = open_dataset(data_dir, use_features=False, load_images=True)   # the online-encoder case
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch, drop_last=True, num_workers=workers,
                                           sampler=ResumableSampler(len(ds), batch, 0, world, seed=0),
                                           persistent_workers=False, generator=torch.Generator().manual_seed(0))


def rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except OSError:
        return None


def throughput(data_dir: str, n: int, batch: int, workers: int) -> float:
    _, dl = loader(data_dir, batch, workers)
    it = iter(dl)
    next(it)                                                   # workers started, first batch out
    steps = max(1, n // batch - 1)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def opens_and_bytes(data_dir: str, n: int, batch: int) -> tuple[float, float | None]:
    _, dl = loader(data_dir, batch, 0)
    count = [0]
    real_open = builtins.open

    def counting_open(*a, **k):
        count[0] += 1
        return real_open(*a, **k)

    it = iter(dl)
    r0 = rchar()
    builtins.open = io.open = counting_open
    try:
        seen = 0
        for _ in range(n // batch):
            next(it)
            seen += batch
    finally:
        builtins.open = io.open = real_open
    r1 = rchar()
    return 1000 * count[0] / seen, (r1 - r0) / seen if r0 is not None and r1 is not None else None


FIRST_BATCH = """
import sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from bench_data import loader
import dataset, data_shards, train, fsspec.implementations.local  # imports are not start-up work we measure
t = time.perf_counter()
ds, dl = loader({data!r}, 32, 0, world=8)
built = time.perf_counter() - t
next(iter(dl))
print(built, time.perf_counter() - t)
"""


def first_batch(data_dir: str) -> tuple[float, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    code = FIRST_BATCH.format(root=os.path.dirname(here), bench=here, data=data_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    built, total = map(float, out.stdout.split()[-2:])
    return built, total


#################################################################################
#                            Read rates on paper                                 #
#################################################################################

def paper_rates(mfu: float) -> list[str]:
    """Samples/s of 8 H100s at the given MFU (analytic FLOPs, benchmarks/flops.py) and the read rates."""
    from benchmarks.flops import PEAK_TFLOPS, train_flops_per_image
    peak = 8 * PEAK_TFLOPS["H100 SXM"]["bf16"] * 1e12
    latents = 8 * 32 * 32 * 4 + 128                     # one (2C, h, w) float32 moments .npy
    png256 = 256 * 256 * 3 + 1000                       # an uncompressed 256 px PNG (convert's)
    feats = 257 * 768 * 2 + 128                         # DINOv2-B class + 256 patch tokens, fp16
    lines = []
    for model in ("SiT-XL/2", "SiT-B/2"):
        for cached in (False, True):
            flops = train_flops_per_image(model, 32, 4, 768, (768,), 2048,
                                          encoder=None if cached else "dinov2-vit-b", resolution=256)
            rate = peak * mfu / flops
            per = latents + (feats if cached else png256)
            lines.append(f"  {model:9s} {'full feature cache' if cached else 'encoder online':18s} {rate:8,.0f} samples/s"
                         f"  {rate * per / 1e6:6,.0f} MB/s  per-file: {2 * rate:7,.0f} opens/s; sharded: "
                         f"{2 * rate:7,.0f} range reads/s on <= {2 * 16} open handles per process")
    return lines


#################################################################################
#                                    main                                        #
#################################################################################

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-samples", type=int, default=512, help="samples of the throughput datasets")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,2,4", help="DataLoader workers to time")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--index-size", type=int, default=1_281_167, help="entries of the start-up simulation")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the paper rates")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    from preprocessing import dataset_tools

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {load:.1f}; {args.num_samples} samples at "
          f"{args.resolution} px, batch {args.batch_size}; reads from the page cache")
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        files, shards = os.path.join(work, "files"), os.path.join(work, "shards")
        write_per_file(files, args.num_samples, args.resolution)
        dataset_tools.pack(files, shards, shard_size=args.shard_size)
        layouts = {"per-file": files, "sharded": shards, "sharded file://": "file://" + shards}
        workers = [int(w) for w in args.workers.split(",") if w != ""]
        print(f"\n{'layout':16s} " + " ".join(f"{f'{w} workers':>11s}" for w in workers) +
              f" {'opens/1k':>9s} {'bytes/sample':>13s}")
        for label, d in layouts.items():
            rates = [throughput(d, args.num_samples, args.batch_size, w) for w in workers]
            opens, per = opens_and_bytes(d, args.num_samples, args.batch_size)
            print(f"{label:16s} " + " ".join(f"{r:9,.0f}/s" for r in rates) +
                  f" {opens:9,.1f} {per if per is None else f'{per:13,.0f}'}")

        n = args.index_size
        # rank 0's first batch of 32 among 8 processes: the first 32 of epoch 0's permutation (+ file 0,
        # which the per-file reader opens for the latent shape)
        needed = sorted(set(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:32].tolist()) | {0})
        blob = png(np.random.default_rng(1), args.resolution)
        big_files, big_shards = os.path.join(work, "big-files"), os.path.join(work, "big-shards")
        write_per_file(big_files, n, args.resolution, only=needed, blob=blob)
        write_sparse_shards(big_shards, n, args.resolution, args.shard_size, needed, blob)
        print(f"\nstart to first batch, {n:,} entries (rank 0 of 8, batch 32, 0 workers): construction + first batch")
        for label, d in {"per-file": big_files, "sharded": big_shards, "sharded file://": "file://" + big_shards}.items():
            built, total = first_batch(d)
            print(f"  {label:16s} {total:6.2f} s  (of which the dataset/index: {built:.2f} s)")
    print(f"\nread rates on paper (8 x H100 SXM bf16 at {args.mfu:.0%} MFU, analytic FLOPs of benchmarks/flops.py):")
    for line in paper_rates(args.mfu):
        print(line)


if __name__ == "__main__":
    main()
