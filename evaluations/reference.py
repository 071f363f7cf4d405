"""Build a reference batch in ADM's .npz format from a folder of images.

    python evaluations/reference.py SOURCE_DIR OUT.npz [--num-images 10000] [--resolution 256] \\
        [--inception-weights PATH] [--no-stats] [--seed 0]

SOURCE_DIR is any folder of images (searched recursively, sorted by relative path), e.g. the PNG folder
written by preprocessing/dataset_tools.py convert. With --resolution, each image goes through ADM's
center crop (BOX halving, BICUBIC to the short side, centre window); without it, all images must already
share one size. --num-images draws a seeded random subset (kept in sorted order).

The output holds `arr_0` uint8 (N, H, W, 3) and, unless --no-stats, ADM's `mu, sigma` (pool_3, 2048) and
`mu_s, sigma_s` (spatial, 2023) from the same InceptionV3 as evaluator.py: by default of the arr_0 images;
with --stats-from all of every image found (ADM's published reference batches hold whole-dataset
statistics and a 10,000-image arr_0 for precision/recall). The reference activations are also left in the
evaluator's cache next to the output, so the first evaluation does not recompute them. Images are
streamed into the archive, so memory stays at one batch; the whole-dataset statistics pass saves its
progress and resumes when rerun with the same arguments; the final file appears atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import from the repository root, not from evaluations/
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evaluations import evaluator, inception, metrics  # noqa: E402
from runtime import resolve_device  # noqa: E402
from fileio import atomic_open, atomic_save_npz, file_sha256  # noqa: E402
from evaluations.image_batches import list_images, load_image  # noqa: E402



# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def select_images(files: list[Path], num_images: int | None, seed: int) -> list[Path]:
    """All files, or a seeded random subset of num_images kept in sorted order."""
    if num_images is None:
        return files
    if num_images < 1 or num_images > len(files):
        raise ValueError(f"--num-images {num_images} is not between 1 and the {len(files)} images found")
    keep = np.sort(np.random.default_rng(seed).choice(len(files), size=num_images, replace=False))
    return [files[i] for i in keep]


# ----------------------------------------------------------------------------------------------------
# Streaming .npz writer (arr_0 never has to fit in memory)
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _npy_stream(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype):
    """Open `name.npy` in the archive and write its header; the caller writes the C-order bytes."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        yield f


def _write_npy(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


# ----------------------------------------------------------------------------------------------------
# Statistics over every image (ADM's reference convention), streamed and resumable
# ----------------------------------------------------------------------------------------------------


def _load_batch(paths: list[Path], resolution: int | None, shape: tuple) -> np.ndarray:
    """(B, H, W, 3) uint8; every image must have `shape` (H, W, 3)."""
    batch = []
    for path in paths:
        img = load_image(path, resolution)
        if img.shape != shape:
            raise ValueError(
                f"{str(path)!r} is {img.shape[1]}x{img.shape[0]}, other images are {shape[1]}x{shape[0]}; "
                "pass --resolution to crop all images to one size"
            )
        batch.append(img)
    return np.stack(batch)


def _fingerprint(files: list[Path], resolution, weights_sha256: str) -> str:
    digest = hashlib.sha256(f"{resolution}|{weights_sha256}|".encode())
    for path in files:
        digest.update(str(path).encode() + b"\0")
    return digest.hexdigest()


def streamed_statistics(model, files, resolution, shape, batch_size, weights_sha256, progress_path, save_every=100):
    """(mu, sigma) of pool and spatial activations over all `files`, without holding the activations.

    Sums and outer-product sums are kept in float64 (sigma = (S2 - N mu mu^T) / (N - 1), as np.cov);
    mu is returned as float32 like ADM's mean of float32 activations. Progress is saved atomically to
    `progress_path` every `save_every` batches and picked up again by a rerun with the same files,
    resolution and weights.
    """
    fingerprint = _fingerprint(files, resolution, weights_sha256)
    dims = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM}
    state = {"next": np.array(0)}
    for k, d in dims.items():
        state[f"sum_{k}"], state[f"outer_{k}"] = np.zeros(d), np.zeros((d, d))  # float64 accumulators
    if progress_path.is_file():
        with np.load(progress_path, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fingerprint:
                state = {k: z[k] for k in state}
                print(f"resuming statistics at image {int(state['next'])} of {len(files)}", file=sys.stderr)
    starts = range(int(state["next"]), len(files), batch_size)
    for i, start in enumerate(tqdm(starts, desc="statistics", disable=None, file=sys.stderr)):
        feats = model(_load_batch(files[start : start + batch_size], resolution, shape))
        for k in dims:
            a = feats[k].astype(np.float64)  # (B, D)
            state[f"sum_{k}"] += a.sum(0)
            state[f"outer_{k}"] += a.T @ a
        state["next"] = np.array(min(start + batch_size, len(files)))
        if (i + 1) % save_every == 0 and state["next"] < len(files):
            atomic_save_npz(progress_path, fingerprint=np.array(fingerprint), **state)
    n = len(files)
    stats = []
    for k in dims:
        mu = state[f"sum_{k}"] / n
        sigma = (state[f"outer_{k}"] - n * np.outer(mu, mu)) / (n - 1)
        stats.append((mu.astype(np.float32), sigma))
    return stats


# ----------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------


def build_reference_batch(
    source,
    out_path,
    num_images: int | None = None,
    resolution: int | None = None,
    seed: int = 0,
    with_stats: bool = True,
    stats_from: str = "subset",
    inception_weights=None,
    batch_size: int = evaluator.DEFAULT_BATCH_SIZE,
    device=None,
) -> Path:
    """Write OUT.npz with arr_0 (and mu/sigma/mu_s/sigma_s unless with_stats=False); returns its path.

    stats_from="subset": statistics of the arr_0 images (np.cov of their activations, exactly as the
    evaluator would compute them). stats_from="all": statistics over every image found while arr_0
    holds the num_images subset, like ADM's published reference batches (whole-dataset statistics plus
    10,000 images for precision/recall); that pass is streamed and resumable.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"output {str(out_path)!r} must end in .npz")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stats_from not in ("subset", "all"):
        raise ValueError(f"stats_from must be 'subset' or 'all', got {stats_from!r}")
    all_files = list_images(source)
    files = select_images(all_files, num_images, seed)
    if with_stats and len(files if stats_from == "subset" else all_files) < 2:
        raise ValueError("statistics need at least 2 images (or pass --no-stats)")
    model = sha = None
    if with_stats:  # fail on missing weights before reading thousands of images
        weights = inception.resolve_weights_path(inception_weights)
        sha = file_sha256(weights)
        device = torch.device(device if device is not None else evaluator.default_device())
        model = inception.InceptionFeatures(weights, device)

    first = load_image(files[0], resolution)
    if first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"{str(files[0])!r} did not decode to an RGB image")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    progress = out_path.with_name(out_path.name + ".stats-progress.npz")
    stats = None
    if with_stats and stats_from == "all":
        stats = streamed_statistics(model, all_files, resolution, first.shape, batch_size, sha, progress)

    pools, spatials = [], []
    with atomic_open(out_path) as out_file:
        with zipfile.ZipFile(out_file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with _npy_stream(zf, "arr_0", (len(files), *first.shape), np.uint8) as f:
                for start in tqdm(range(0, len(files), batch_size), desc="reference", disable=None, file=sys.stderr):
                    batch = _load_batch(files[start : start + batch_size], resolution, first.shape)  # (B, H, W, 3)
                    f.write(batch.tobytes())
                    if model is not None:
                        feats = model(batch)
                        pools.append(feats["pool"])
                        spatials.append(feats["spatial"])
            if model is not None:
                pool, spatial = np.concatenate(pools), np.concatenate(spatials)
                if stats is None:
                    stats = (metrics.activation_statistics(pool), metrics.activation_statistics(spatial))
                (mu, sigma), (mu_s, sigma_s) = stats
                for name, value in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
                    _write_npy(zf, name, value)
    with contextlib.suppress(FileNotFoundError):
        progress.unlink()
    if model is not None:  # seed the evaluator's activation cache for this reference batch
        evaluator.write_activation_cache(out_path, {"pool": pool, "spatial": spatial}, sha)
    return out_path


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build an ADM-format reference batch (.npz) from an image folder.")
    parser.add_argument("source", help="folder of images (recursive), e.g. a preprocessed PNG dataset folder")
    parser.add_argument("out", help="output .npz")
    parser.add_argument("--num-images", type=int, default=None, help="seeded random subset of this size (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    parser.add_argument("--resolution", type=int, default=None, help="ADM center crop to this size (default: keep)")
    parser.add_argument("--no-stats", action="store_true", help="write arr_0 only (no Inception weights needed)")
    parser.add_argument(
        "--stats-from",
        choices=("subset", "all"),
        default="subset",
        help="statistics of the arr_0 images (subset) or of every image found (all, ADM's reference convention; "
        "streamed and resumable)",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        help=f"torch-fidelity's {inception.PUBLISHED_WEIGHTS_NAME} (default: ${inception.WEIGHTS_ENV})",
    )
    parser.add_argument("--batch-size", type=int, default=evaluator.DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    return parser


def main(argv=None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, local_rank=0, world_size=1)
    except ValueError as e:
        parser.error(str(e))
    try:
        out = build_reference_batch(args.source, args.out, num_images=args.num_images, resolution=args.resolution,
                                    seed=args.seed, with_stats=not args.no_stats, stats_from=args.stats_from,
                                    inception_weights=args.inception_weights, batch_size=args.batch_size,
                                    device=device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
