"""ADM-compatible sample evaluation without TensorFlow: Inception Score, FID, sFID, precision, recall.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--inception-weights PATH] [--batch-size 64] [--device cuda]

Inputs are ADM's batch format: an .npz whose `arr_0` holds uint8 images (N, H, W, 3). A reference batch
may also hold `mu, sigma, mu_s, sigma_s` (pool_3 and spatial statistics); like ADM we then use those for
FID/sFID, while its images are still needed for precision/recall. Reference activations are cached next
to the reference batch (`<ref stem>.inception-acts.npz`, keyed by the weights' hash and the file's size
and mtime), so repeated evaluations against one reference only run the network on the samples.

Prints the five numbers in ADM's wording and writes them to `<sample stem>.metrics.json` next to the
sample batch. See evaluations/README.md for the parity check against ADM's published numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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

from evaluations import inception, metrics  # noqa: E402
from fileio import atomic_save_npz, atomic_write_json, file_sha256  # noqa: E402

DEFAULT_BATCH_SIZE = 64  # ADM's default; results do not depend on it
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FID_METHODS = ("adm", "lowrank")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Streaming reads of one array inside an .npz (50K 256px images are ~10 GB; never load them whole)
# ----------------------------------------------------------------------------------------------------


class NpzArray:
    """One array of an .npz archive, read lazily in row batches.

    Use as a context manager: `with NpzArray(path, "arr_0") as a: a.shape, a.dtype, a.batches(64)`.
    Only the .npy header is parsed on entry, so shape/dtype checks are cheap.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "NpzArray":
        try:
            zf = self._stack.enter_context(zipfile.ZipFile(self.path))
        except zipfile.BadZipFile:
            raise ValueError(f"{str(self.path)!r} is not an .npz archive (np.savez output)") from None
        member = f"{self.key}.npy"
        if member not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            self._stack.close()
            raise ValueError(f"{str(self.path)!r} has no array {self.key!r} (found {keys})")
        self._file = self._stack.enter_context(zf.open(member))
        version = np.lib.format.read_magic(self._file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
        else:
            shape, fortran, dtype = None, True, None  # unusual header: fall back to a full load
        self._whole = None
        if fortran or dtype is None or dtype.hasobject:
            with np.load(self.path, allow_pickle=False) as z:
                self._whole = np.ascontiguousarray(z[self.key])
            shape, dtype = self._whole.shape, self._whole.dtype
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def batches(self, batch_size: int):
        """Yield consecutive (<= batch_size, *shape[1:]) arrays covering all rows once."""
        n = self.shape[0]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            if self._whole is not None:
                yield self._whole[start : start + count]
                continue
            want = count * row_bytes
            data = self._file.read(want)
            if len(data) != want:
                raise ValueError(f"{str(self.path)!r}: {self.key} ends early (truncated file?)")
            yield np.frombuffer(data, dtype=self.dtype).reshape((count, *self.shape[1:]))


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays stored in an .npz archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    except zipfile.BadZipFile:
        raise ValueError(f"{str(path)!r} is not an .npz archive (np.savez output)") from None


def check_image_batch(path: str | os.PathLike, role: str, min_images: int = PR_NEIGHBOURS + 1) -> tuple:
    """Validate `arr_0` of a batch file: uint8, (N, H, W, 3), N >= min_images. Returns its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} batch {str(path)!r} does not exist")
    keys = npz_keys(path)
    if "arr_0" not in keys:
        why = "precision/recall need the reference images" if role == "reference" else "ADM keeps images in arr_0"
        raise ValueError(
            f"{role} batch {str(path)!r} has no images: expected 'arr_0' uint8 (N, H, W, 3), found keys {keys}; {why}"
        )
    with NpzArray(path, "arr_0") as arr:
        shape, dtype = arr.shape, arr.dtype
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
        raise ValueError(
            f"{role} batch {str(path)!r}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {shape}"
        )
    if shape[0] < min_images:
        raise ValueError(
            f"{role} batch {str(path)!r} has {shape[0]} images; need at least {min_images} "
            f"(covariances and k={PR_NEIGHBOURS} nearest neighbours)"
        )
    return shape


def stored_statistics(path: str | os.PathLike, role: str):
    """ADM's rule: if the batch holds `mu`, use (mu, sigma) and (mu_s, sigma_s) from it; else None."""
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files:
            return None
        missing = [k for k in STAT_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{role} batch {str(path)!r} has 'mu' but lacks {missing}; store all of {list(STAT_KEYS)}")
        mu, sigma, mu_s, sigma_s = (z[k] for k in STAT_KEYS)
    expected = {
        "mu": (inception.POOL_DIM,),
        "sigma": (inception.POOL_DIM,) * 2,
        "mu_s": (inception.SPATIAL_DIM,),
        "sigma_s": (inception.SPATIAL_DIM,) * 2,
    }
    for key, value in zip(STAT_KEYS, (mu, sigma, mu_s, sigma_s)):
        if value.shape != expected[key]:
            raise ValueError(f"{role} batch {str(path)!r}: {key} has shape {value.shape}, expected {expected[key]}")
    return (mu, sigma), (mu_s, sigma_s)


# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------


def compute_activations(model: inception.InceptionFeatures, path, batch_size: int, desc: str) -> dict:
    """Run the network over `arr_0` of a batch file: {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}."""
    out = {"pool": [], "spatial": [], "logits": []}
    with NpzArray(path, "arr_0") as arr:
        n_batches = -(-arr.shape[0] // batch_size)
        for batch in tqdm(arr.batches(batch_size), total=n_batches, desc=desc, disable=None, file=sys.stderr):
            feats = model(batch)
            for key in out:
                out[key].append(feats[key])
    return {key: np.concatenate(parts, axis=0) for key, parts in out.items()}


def activation_cache_path(ref_path: str | os.PathLike) -> Path:
    ref_path = Path(ref_path)
    return ref_path.with_name(ref_path.stem + ".inception-acts.npz")


def _cache_key(ref_path: Path, weights_sha256: str) -> dict:
    st = ref_path.stat()
    return {"weights_sha256": weights_sha256, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def read_activation_cache(ref_path, weights_sha256: str) -> dict | None:
    """Cached {"pool", "spatial"} of a reference batch, or None if absent, stale or unreadable.

    Valid only for the same weights (SHA-256) and the same reference file (size and mtime).
    """
    ref_path = Path(ref_path)
    cache = activation_cache_path(ref_path)
    if not cache.is_file():
        return None
    key = _cache_key(ref_path, weights_sha256)
    try:
        with np.load(cache, allow_pickle=False) as z:
            if (
                str(z["weights_sha256"]) != key["weights_sha256"]
                or int(z["source_size"]) != key["source_size"]
                or int(z["source_mtime_ns"]) != key["source_mtime_ns"]
            ):
                return None
            pool, spatial = z["pool"], z["spatial"]
    except Exception as e:  # a damaged cache is just recomputed
        _log(f"ignoring unreadable activation cache {cache}: {type(e).__name__}")
        return None
    if pool.shape[1:] != (inception.POOL_DIM,) or spatial.shape != (len(pool), inception.SPATIAL_DIM):
        return None
    return {"pool": pool, "spatial": spatial}


def write_activation_cache(ref_path, acts: dict, weights_sha256: str) -> None:
    """Store reference activations next to the batch; an unwritable folder only costs the cache."""
    ref_path = Path(ref_path)
    cache = activation_cache_path(ref_path)
    key = _cache_key(ref_path, weights_sha256)
    try:
        atomic_save_npz(
            cache,
            pool=acts["pool"],
            spatial=acts["spatial"],
            weights_sha256=np.array(key["weights_sha256"]),
            source_size=np.array(key["source_size"], dtype=np.int64),
            source_mtime_ns=np.array(key["source_mtime_ns"], dtype=np.int64),
        )
    except OSError as e:
        _log(f"could not write activation cache {cache}: {e}")


def reference_activations(model, ref_path, batch_size: int, weights_sha256: str, use_cache: bool = True) -> dict:
    """Reference {"pool", "spatial"} activations, read from / written to the cache next to the batch."""
    if use_cache:
        cached = read_activation_cache(ref_path, weights_sha256)
        if cached is not None:
            n = check_image_batch(ref_path, "reference")[0]
            if len(cached["pool"]) == n:
                _log(f"reading cached reference activations {activation_cache_path(ref_path)}")
                return cached
    acts = compute_activations(model, ref_path, batch_size, "reference")
    acts = {"pool": acts["pool"], "spatial": acts["spatial"]}
    if use_cache:
        write_activation_cache(ref_path, acts, weights_sha256)
    return acts


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(
    ref_npz_path,
    sample_npz_path,
    inception_weights=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device=None,
    use_cache: bool = True,
    fid_method: str = "adm",
    details: dict | None = None,
) -> dict:
    """ADM's five numbers for a sample batch against a reference batch.

    Returns {"inception_score", "fid", "sfid", "precision", "recall"} as Python floats. `inception_weights`
    is a path (None: $REG_INCEPTION_WEIGHTS). fid_method "adm" (default) computes FID/sFID with ADM's sqrtm;
    "lowrank" uses the exact small-batch formula on the sample activations (fast on CPU, not ADM's numerics
    on singular covariances; see metrics.frechet_distance_from_activations). If `details` is a dict, it is
    filled with the sizes and the weights' hash (the CLI stores them in the JSON).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if fid_method not in FID_METHODS:
        raise ValueError(f"fid_method must be one of {FID_METHODS}, got {fid_method!r}")
    ref_shape = check_image_batch(ref_npz_path, "reference")
    sample_shape = check_image_batch(sample_npz_path, "sample")
    ref_stats = stored_statistics(ref_npz_path, "reference")
    sample_stats = stored_statistics(sample_npz_path, "sample")
    if fid_method == "lowrank" and sample_stats is not None:
        raise ValueError(f"fid_method 'lowrank' needs sample activations, but {sample_npz_path} stores mu/sigma")
    weights = inception.resolve_weights_path(inception_weights)
    device = torch.device(device if device is not None else default_device())

    sha = file_sha256(weights)
    if not inception.is_published_weights(sha):
        _log(
            f"WARNING: {weights} is not the published Inception file (SHA-256 {sha[:8]}..., expected "
            f"{inception.PUBLISHED_SHA256_PREFIX}...); the numbers are NOT comparable with ADM's"
        )
    model = inception.InceptionFeatures(weights, device)

    _log("computing reference batch activations...")
    ref_acts = reference_activations(model, ref_npz_path, batch_size, sha, use_cache)
    _log("computing/reading reference batch statistics...")
    if ref_stats is None:
        ref_stats = (
            metrics.activation_statistics(ref_acts["pool"]),
            metrics.activation_statistics(ref_acts["spatial"]),
        )
    else:
        _log(f"using mu/sigma/mu_s/sigma_s stored in {ref_npz_path}")

    _log("computing sample batch activations...")
    sample_acts = compute_activations(model, sample_npz_path, batch_size, "sample")
    _log("computing/reading sample batch statistics...")
    if sample_stats is None:
        sample_stats = (
            metrics.activation_statistics(sample_acts["pool"]),
            metrics.activation_statistics(sample_acts["spatial"]),
        )
    else:
        _log(f"using mu/sigma/mu_s/sigma_s stored in {sample_npz_path}")

    _log("Computing evaluations...")
    (mu, sigma), (mu_s, sigma_s) = sample_stats
    (ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s) = ref_stats
    precision, recall = metrics.precision_recall(ref_acts["pool"], sample_acts["pool"], k=PR_NEIGHBOURS, device=device)
    if fid_method == "adm":
        fid = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)  # sample first, as in ADM
        sfid = metrics.frechet_distance(mu_s, sigma_s, ref_mu_s, ref_sigma_s)
    else:
        fid = metrics.frechet_distance_from_activations(sample_acts["pool"], ref_mu, ref_sigma)
        sfid = metrics.frechet_distance_from_activations(sample_acts["spatial"], ref_mu_s, ref_sigma_s)
    result = {
        "inception_score": metrics.inception_score(sample_acts["logits"], split_size=IS_SPLIT_SIZE, from_logits=True),
        "fid": fid,
        "sfid": sfid,
        "precision": float(precision),
        "recall": float(recall),
    }
    if details is not None:
        details.update(
            num_reference=int(ref_shape[0]),
            num_samples=int(sample_shape[0]),
            sample_resolution=[int(sample_shape[1]), int(sample_shape[2])],
            fid_method=fid_method,
            inception_weights_sha256=sha,
            published_inception_weights=inception.is_published_weights(sha),
        )
    return result


def metrics_json_path(sample_npz_path) -> Path:
    p = Path(sample_npz_path)
    return p.with_name(p.stem + ".metrics.json")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ADM-compatible IS / FID / sFID / precision / recall of a sample batch (PyTorch, offline)."
    )
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC)")
    parser.add_argument(
        "--inception-weights",
        default=None,
        help=f"torch-fidelity's {inception.PUBLISHED_WEIGHTS_NAME} (default: ${inception.WEIGHTS_ENV})",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per network call")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the reference activation cache")
    parser.add_argument(
        "--fid-method",
        choices=FID_METHODS,
        default="adm",
        help="adm: scipy sqrtm as ADM (use for reported numbers; minutes on a CPU); lowrank: exact formula via "
        "the sample activations, for quick small-batch checks (N < 2048) on a CPU",
    )
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or default_device()
    try:
        device = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")

    details: dict = {}
    try:
        result = evaluate(
            args.ref_batch,
            args.sample_batch,
            inception_weights=args.inception_weights,
            batch_size=args.batch_size,
            device=device,
            use_cache=not args.no_cache,
            fid_method=args.fid_method,
            details=details,
        )
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    print("Inception Score:", result["inception_score"])
    print("FID:", result["fid"])
    print("sFID:", result["sfid"])
    print("Precision:", result["precision"])
    print("Recall:", result["recall"])

    out = metrics_json_path(args.sample_batch)
    payload = dict(result)
    payload.update(details)
    payload.update(reference_batch=str(Path(args.ref_batch).resolve()), sample_batch=str(Path(args.sample_batch).resolve()))
    atomic_write_json(out, payload)
    _log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
