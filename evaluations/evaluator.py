"""ADM-compatible sample evaluation without TensorFlow: Inception Score, FID, sFID, precision, recall.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--inception-weights PATH] [--batch-size 64] [--device cuda]

Inputs are ADM's batch format: an .npz whose `arr_0` holds uint8 images (N, H, W, 3). A reference batch
may also hold `mu, sigma, mu_s, sigma_s` (pool_3 and spatial statistics); like ADM we then use those for
FID/sFID, while its images are still needed for precision/recall. Reference activations are cached next
to the reference batch (`<ref stem>.inception-acts.npz`, keyed by the weights' hash and the file's size
and mtime), so repeated evaluations against one reference only run the network on the samples.

Prints the five numbers in ADM's wording and writes them to `<sample stem>.metrics.json` next to the
sample batch. With DINOv2 ViT-L/14 weights (`--fd-dinov2-weights` or $REG_FD_DINOV2_WEIGHTS) it also
reports EDM2's FD-DINOv2 of the same images (evaluations/fd_dinov2.py; reference statistics cached
next to the reference batch as `<ref stem>.fd_dinov2.npz`). See evaluations/README.md for the parity check against ADM's published numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import from the repository root, not from evaluations/
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evaluations import fd_dinov2, inception, metrics  # noqa: E402
from evaluations.image_batches import NpzArray, npz_keys, source_images  # noqa: E402
from runtime import resolve_device  # noqa: E402
from fileio import atomic_save_npz, atomic_write_bytes, atomic_write_json, file_sha256  # noqa: E402

DEFAULT_BATCH_SIZE = 64  # ADM's default; results do not depend on it
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FID_METHODS = ("adm", "lowrank")
FID_METHOD_ENV = "REG_FID_METHOD"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Image batches (read in row batches by evaluations/image_batches.py: never whole)
# ----------------------------------------------------------------------------------------------------


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


def default_fid_method() -> str:
    """$REG_FID_METHOD if set (e.g. lowrank for CPU smoke runs of scripts whose command lines are fixed),
    else adm."""
    return os.environ.get(FID_METHOD_ENV) or "adm"


def _check_images(images, role: str = "sample", min_images: int = 1) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{role} images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) < min_images:
        raise ValueError(
            f"{role} batch has {len(images)} images; need at least {min_images} "
            f"(covariances and k={PR_NEIGHBOURS} nearest neighbours)"
        )
    return images


class Evaluator:
    """ADM's five numbers against one reference batch, for repeated in-process use.

        ev = Evaluator("VIRTUAL_imagenet256_labeled.npz", inception_weights, device="cuda")
        ev.evaluate(images)          # uint8 (N, H, W, 3) -> {"inception_score", "fid", "sfid", "precision", "recall"}

    Inception is loaded once and kept. The reference activations and statistics are read (or computed
    once and cached next to the batch) on first use and kept, so a process that only computes
    activations never touches the reference. Several processes: each runs ``activations(its images)``,
    the caller gathers the dicts (in image order; the Inception Score splits by position) and one
    process calls ``metrics_from_activations(list_of_dicts)``; the numbers equal a single process's on
    the concatenated images. ``evaluate()`` (the CLI) goes through this class, so both give the same
    numbers for the same images.
    """

    def __init__(
        self,
        ref_batch,
        inception_weights=None,
        device=None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        use_cache: bool = True,
        fid_method: str | None = None,
        fd_dinov2_weights=None,
    ):
        """``fd_dinov2_weights``: DINOv2 ViT-L/14 weights (None: $REG_FD_DINOV2_WEIGHTS if set) turn on
        FD-DINOv2; False turns it off."""
        fid_method = fid_method or default_fid_method()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if fid_method not in FID_METHODS:
            raise ValueError(f"fid_method must be one of {FID_METHODS}, got {fid_method!r}")
        self.ref_path = Path(ref_batch)
        self.ref_shape = check_image_batch(self.ref_path, "reference")
        self._stored_ref_stats = stored_statistics(self.ref_path, "reference")
        self.batch_size, self.use_cache, self.fid_method = batch_size, use_cache, fid_method
        self.weights = inception.resolve_weights_path(inception_weights)
        self.device = torch.device(device if device is not None else default_device())
        self.weights_sha256 = file_sha256(self.weights)
        if not inception.is_published_weights(self.weights_sha256):
            _log(
                f"WARNING: {self.weights} is not the published Inception file (SHA-256 {self.weights_sha256[:8]}..., "
                f"expected {inception.PUBLISHED_SHA256_PREFIX}...); the numbers are NOT comparable with ADM's"
            )
        self.model = inception.InceptionFeatures(self.weights, self.device)
        self._ref_acts = self._ref_stats = None
        if fd_dinov2_weights is None:
            fd_dinov2_weights = os.environ.get(fd_dinov2.WEIGHTS_ENV) or False
        self.fdd = (fd_dinov2.FDDINOv2Metric(self.ref_path, fd_dinov2_weights, self.device, batch_size, use_cache)
                    if fd_dinov2_weights else None)

    # ---- reference (lazy, kept) ----
    def reference(self) -> tuple[dict, tuple]:
        """(reference activations {"pool", "spatial"}, ((mu, sigma), (mu_s, sigma_s))), computed once."""
        if self._ref_acts is None:
            _log("computing reference batch activations...")
            self._ref_acts = reference_activations(
                self.model, self.ref_path, self.batch_size, self.weights_sha256, self.use_cache
            )
            _log("computing/reading reference batch statistics...")
            if self._stored_ref_stats is None:
                self._ref_stats = (
                    metrics.activation_statistics(self._ref_acts["pool"]),
                    metrics.activation_statistics(self._ref_acts["spatial"]),
                )
            else:
                _log(f"using mu/sigma/mu_s/sigma_s stored in {self.ref_path}")
                self._ref_stats = self._stored_ref_stats
        return self._ref_acts, self._ref_stats

    # ---- samples ----
    def activations(self, images) -> dict:
        """uint8 images (N, H, W, 3) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)},
        computed batch_size at a time (N may be 0: empty arrays, e.g. a rank with no images)."""
        images = _check_images(images, min_images=0)
        out = {"pool": [], "spatial": [], "logits": []}
        for start in range(0, len(images), self.batch_size):
            feats = self.model(images[start : start + self.batch_size])
            for key in out:
                out[key].append(feats[key])
        dims = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM, "logits": inception.NUM_LOGITS}
        acts = {k: np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32) for k, v in out.items()}
        if self.fdd is not None:
            acts.update(self.fdd.activations(images))
        return acts

    def metrics_from_activations(self, acts, sample_stats=None) -> dict:
        """The five numbers from sample activations: one dict, or a list of dicts (e.g. gathered from
        several processes, in image order) that are concatenated. ``sample_stats`` ((mu, sigma),
        (mu_s, sigma_s)) replaces the statistics of the activations for FID/sFID (ADM's rule for a
        sample batch that stores them)."""
        if isinstance(acts, (list, tuple)):
            acts = {k: np.concatenate([a[k] for a in acts]) for k in acts[0] if k in ("pool", "spatial", "logits", "dinov2")}
        _check_features_count(len(acts["pool"]))
        ref_acts, ref_stats = self.reference()
        _log("computing/reading sample batch statistics...")
        if sample_stats is None:
            sample_stats = (
                metrics.activation_statistics(acts["pool"]),
                metrics.activation_statistics(acts["spatial"]),
            )
        elif self.fid_method == "lowrank":
            raise ValueError("fid_method 'lowrank' needs sample activations, but the sample batch stores mu/sigma")
        _log("Computing evaluations...")
        (mu, sigma), (mu_s, sigma_s) = sample_stats
        (ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s) = ref_stats
        precision, recall = metrics.precision_recall(ref_acts["pool"], acts["pool"], k=PR_NEIGHBOURS, device=self.device)
        if self.fid_method == "adm":
            fid = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)  # sample first, as in ADM
            sfid = metrics.frechet_distance(mu_s, sigma_s, ref_mu_s, ref_sigma_s)
        else:
            fid = metrics.frechet_distance_from_activations(acts["pool"], ref_mu, ref_sigma)
            sfid = metrics.frechet_distance_from_activations(acts["spatial"], ref_mu_s, ref_sigma_s)
        result = {
            "inception_score": metrics.inception_score(acts["logits"], split_size=IS_SPLIT_SIZE, from_logits=True),
            "fid": fid,
            "sfid": sfid,
            "precision": float(precision),
            "recall": float(recall),
        }
        if self.fdd is not None and "dinov2" in acts:
            result.update(self.fdd.metrics_from_activations(acts))
        return result

    def evaluate(self, images) -> dict:
        """The five numbers of an in-memory uint8 batch (N, H, W, 3)."""
        images = _check_images(images, min_images=PR_NEIGHBOURS + 1)
        _log("computing sample batch activations...")
        return self.metrics_from_activations(self.activations(images))

    def evaluate_npz(self, sample_npz_path) -> dict:
        """The five numbers of a sample batch file (streamed; its stored mu/sigma are used if present)."""
        check_image_batch(sample_npz_path, "sample")
        sample_stats = stored_statistics(sample_npz_path, "sample")
        if self.fid_method == "lowrank" and sample_stats is not None:
            raise ValueError(f"fid_method 'lowrank' needs sample activations, but {sample_npz_path} stores mu/sigma")
        self.reference()
        _log("computing sample batch activations...")
        acts = compute_activations(self.model, sample_npz_path, self.batch_size, "sample")
        if self.fdd is not None:
            self.fdd.reference()
            acts["dinov2"] = np.concatenate([self.fdd.activations(batch)["dinov2"]
                                             for batch in source_images(sample_npz_path, self.batch_size)])
        if sample_stats is not None:
            _log(f"using mu/sigma/mu_s/sigma_s stored in {sample_npz_path}")
        return self.metrics_from_activations(acts, sample_stats)


def _check_features_count(n: int) -> None:
    if n < PR_NEIGHBOURS + 1:
        raise ValueError(
            f"sample batch has {n} images; need at least {PR_NEIGHBOURS + 1} "
            f"(covariances and k={PR_NEIGHBOURS} nearest neighbours)"
        )


def evaluate(
    ref_npz_path,
    sample_npz_path,
    inception_weights=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device=None,
    use_cache: bool = True,
    fid_method: str | None = None,
    details: dict | None = None,
    fd_dinov2_weights=None,
) -> dict:
    """ADM's five numbers for a sample batch against a reference batch.

    Returns {"inception_score", "fid", "sfid", "precision", "recall"} as Python floats. `inception_weights`
    is a path (None: $REG_INCEPTION_WEIGHTS). fid_method "adm" (default; $REG_FID_METHOD overrides the
    default) computes FID/sFID with ADM's sqrtm; "lowrank" uses the exact small-batch formula on the sample
    activations (fast on CPU, not ADM's numerics on singular covariances; see
    metrics.frechet_distance_from_activations). If `details` is a dict, it is filled with the sizes and the
    weights' hash (the CLI stores them in the JSON).
    """
    sample_shape = check_image_batch(sample_npz_path, "sample")      # before Inception loads: fail early
    ev = Evaluator(ref_npz_path, inception_weights, device, batch_size, use_cache, fid_method, fd_dinov2_weights)
    result = ev.evaluate_npz(sample_npz_path)
    if details is not None:
        details.update(
            num_reference=int(ev.ref_shape[0]),
            num_samples=int(sample_shape[0]),
            sample_resolution=[int(sample_shape[1]), int(sample_shape[2])],
            fid_method=ev.fid_method,
            inception_weights_sha256=ev.weights_sha256,
            published_inception_weights=inception.is_published_weights(ev.weights_sha256),
        )
        if ev.fdd is not None:
            details.update(fd_dinov2_weights_sha256=ev.fdd.weights_sha256)
    return result


def metrics_json_path(sample_npz_path) -> Path:
    p = Path(sample_npz_path)
    return p.with_name(p.stem + ".metrics.json")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ADM-compatible IS / FID / sFID / precision / recall of a sample batch (PyTorch, offline). "
        "Batches are given as REF SAMPLE or, as in the REG release's eval.sh, --ref_batch REF --sample_batch SAMPLE."
    )
    parser.add_argument("ref", nargs="?", default=None, metavar="ref_batch",
                        help="reference batch .npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample", nargs="?", default=None, metavar="sample_batch", help="sample batch .npz (arr_0 uint8 NHWC)")
    parser.add_argument("--ref_batch", "--ref-batch", dest="ref_batch", default=None, help="the release's spelling of ref_batch")
    parser.add_argument("--sample_batch", "--sample-batch", dest="sample_batch", default=None,
                        help="the release's spelling of sample_batch")
    parser.add_argument(
        "--inception-weights",
        default=None,
        help=f"torch-fidelity's {inception.PUBLISHED_WEIGHTS_NAME} (default: ${inception.WEIGHTS_ENV})",
    )
    parser.add_argument("--fd-dinov2-weights", default=None,
                        help=f"DINOv2 ViT-L/14 weights ({fd_dinov2.WEIGHTS_NAME}; default ${fd_dinov2.WEIGHTS_ENV}): "
                        "also report EDM2's FD-DINOv2 of the same images (off when neither is given)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per network call")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the reference activation cache")
    parser.add_argument(
        "--fid-method",
        choices=FID_METHODS,
        default=None,
        help=f"adm (default, or ${FID_METHOD_ENV}): scipy sqrtm as ADM (use for reported numbers; minutes on a CPU); "
        "lowrank: exact formula via the sample activations, for quick small-batch checks (N < 2048) on a CPU",
    )
    g = parser.add_argument_group(
        "the REG release's results file",
        "with --save_path, the five lines are also written to the file named by the plain string concatenation "
        "SAVE_PATH + NUM_STEPS + STEP + CFG + GH + CLS_CFG + 'cfg_cond_true.txt' (or 'cfg_cond_false.txt' when "
        "--cfg_cond 0), as the release does (no separator: with SAVE_PATH .../checkpoints the file lands beside "
        "that folder, which is created if missing)",
    )
    g.add_argument("--save_path", "--save-path", dest="save_path", default=None)
    g.add_argument("--cfg_cond", "--cfg-cond", dest="cfg_cond", type=int, default=1)
    g.add_argument("--step", type=int, default=1)
    g.add_argument("--num_steps", "--num-steps", dest="num_steps", type=int, default=250)
    g.add_argument("--cfg", type=float, default=1.0)
    g.add_argument("--cls_cfg", "--cls-cfg", dest="cls_cfg", type=float, default=1.0)
    g.add_argument("--gh", type=float, default=1.0)
    return parser


def release_results_path(save_path: str, num_steps: int, step: int, cfg: float, gh: float, cls_cfg: float,
                         cfg_cond: int) -> str:
    """The REG release's results file name: the plain concatenation, in the release's order."""
    suffix = "cfg_cond_true.txt" if cfg_cond else "cfg_cond_false.txt"
    return str(save_path) + str(num_steps) + str(step) + str(cfg) + str(gh) + str(cls_cfg) + suffix


RESULT_LINES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                ("Precision", "precision"), ("Recall", "recall"))


def write_release_results(path: str, result: dict) -> None:
    """The five lines "Inception Score: v" ... "Recall: v" (written atomically)."""
    text = "".join(f"{label}: {result[key]}\n" for label, key in RESULT_LINES)
    atomic_write_bytes(path, text.encode("utf-8"))


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, positional in (("ref_batch", "ref"), ("sample_batch", "sample")):
        given = [v for v in (getattr(args, flag), getattr(args, positional)) if v is not None]
        if len(given) != 1:
            parser.error(f"give the {flag.replace('_', ' ')} once: as the {'first' if flag == 'ref_batch' else 'second'} "
                         f"positional argument or as --{flag}" + (" (got both)" if given else ""))
        setattr(args, flag, given[0])
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device, local_rank=0, world_size=1)
    except ValueError as e:
        parser.error(str(e))
    fid_method = args.fid_method or default_fid_method()
    if fid_method not in FID_METHODS:
        parser.error(f"${FID_METHOD_ENV}={fid_method!r} is not one of {', '.join(FID_METHODS)}")
    if args.save_path is not None:  # before minutes of work: the release creates the folder first
        try:
            os.makedirs(args.save_path, exist_ok=True)
        except OSError as e:
            parser.error(f"cannot create --save_path {args.save_path}: {e.strerror or e}")

    details: dict = {}
    try:
        result = evaluate(args.ref_batch, args.sample_batch, inception_weights=args.inception_weights,
                          batch_size=args.batch_size, device=device, use_cache=not args.no_cache,
                          fid_method=fid_method, details=details, fd_dinov2_weights=args.fd_dinov2_weights)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    for label, key in RESULT_LINES:
        print(f"{label}:", result[key])
    if "fd_dinov2" in result:
        print("FD_DINOv2:", result["fd_dinov2"])

    out = metrics_json_path(args.sample_batch)
    payload = dict(result)
    payload.update(details)
    payload.update(reference_batch=str(Path(args.ref_batch).resolve()), sample_batch=str(Path(args.sample_batch).resolve()))
    atomic_write_json(out, payload)
    _log(f"wrote {out}")
    if args.save_path is not None:
        txt = release_results_path(args.save_path, args.num_steps, args.step, args.cfg, args.gh, args.cls_cfg,
                                   args.cfg_cond)
        write_release_results(txt, result)
        _log(f"wrote {txt}")
    return result


if __name__ == "__main__":
    main()
