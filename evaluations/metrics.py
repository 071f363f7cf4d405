"""ADM's sample-quality statistics, computed from Inception activations.

Each function mirrors the arithmetic of OpenAI's ADM evaluator (guided-diffusion/evaluations) so that
numbers are comparable with published tables, including its dtypes and its numerical fallbacks:

- activation_statistics: mean in the activations' dtype (float32 for Inception features), covariance
  from np.cov (float64), as ADM computes them.
- frechet_distance: scipy's sqrtm of sigma1 @ sigma2; if that is not finite, 1e-6 is added to both
  diagonals and sqrtm is retried; a complex result is accepted only if the imaginary part of its diagonal
  is within 1e-3 of zero (then the real part is used), else ValueError.
- inception_score: softmax over 1008 logits (no bias, float32), sequential splits of 5,000 (the last split
  may be shorter), exp(mean KL(p(y|x) || p(y))) per split, averaged over splits without weights.
- precision_recall: improved precision/recall (Kynkaanniemi et al. 2019) with k = 3. Squared Euclidean
  distances are computed the way ADM's TF graph does on a GPU: inputs cast to float16, squares, norms,
  the matmul and each add rounded to float16 (accumulation in float32), clamped at 0, and only if a
  (row block x column block) holds a non-finite value the block is recomputed in float32. The radius of a
  point is its k-th nearest neighbour's squared distance within its own set (self included at distance
  ~0, so the (k+1)-th smallest value). Precision: fraction of samples inside some reference ball;
  recall: fraction of references inside some sample ball; both with <=.

Differences from ADM: 0 * log 0 is taken as 0 in the Inception Score (ADM would give NaN; real softmax
outputs are never exactly 0), and inputs are validated with clear errors.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

# ----------------------------------------------------------------------------------------------------
# FID statistics
# ----------------------------------------------------------------------------------------------------


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of activations (N, D): mean in the input dtype (float32 for Inception), covariance float64.

    Exactly ADM's `np.mean(acts, axis=0)` and `np.cov(acts, rowvar=False)`.
    """
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"activations must be a 2-D array (N, D), got shape {acts.shape}")
    if len(acts) < 2:
        raise ValueError(f"need at least 2 activation vectors for a covariance, got {len(acts)}")
    if not np.isfinite(acts).all():
        raise ValueError("activations contain NaN or inf")
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; we test finiteness ourselves, as ADM does with disp=False.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), with ADM's numerical handling.

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). If sqrtm is not finite, eps is
    added to both diagonals (with a warning); small imaginary parts are dropped, large ones raise.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d} to match the means, got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of the covariance product is not finite; adding {eps} to both diagonals")
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                "are both covariances symmetric positive semi-definite?"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_activations(acts, mu_other, sigma_other) -> float:
    """Frechet distance between the statistics of `acts` (N, D) and (mu_other, sigma_other), exactly.

    NOT ADM's numerics: meant for small batches (N well below D) on a CPU, where ADM's scipy sqrtm of a
    2048 x 2048 product takes minutes and, the covariance being singular, returns a value that depends on
    its 1e-6 fallback. With A = (acts - mu) / sqrt(N - 1), sigma = A^T A and the non-zero eigenvalues of
    sigma @ sigma_other are those of the N x N matrix A sigma_other A^T, so
    tr sqrtm(sigma sigma_other) = sum sqrt(eigvalsh(A sigma_other A^T)). Equals frechet_distance() for
    full-rank inputs (up to rounding); cost O(N D^2 + N^3).
    """
    mu, sigma = activation_statistics(acts)
    mu_other, sigma_other = np.atleast_1d(mu_other), np.atleast_2d(sigma_other)
    d = mu.shape[0]
    if mu_other.shape != (d,) or sigma_other.shape != (d, d):
        raise ValueError(
            f"other statistics must be ({d},) and ({d}, {d}) to match the activations, "
            f"got {mu_other.shape} and {sigma_other.shape}"
        )
    a = (np.asarray(acts, dtype=np.float64) - mu.astype(np.float64)) / np.sqrt(len(acts) - 1)  # (N, D)
    gram = a @ sigma_other @ a.T  # (N, N), symmetric PSD up to rounding
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    # Zero eigenvalues come out as +-1e-16-ish noise whose square roots would add up; drop them.
    eig[eig <= eig.max(initial=0.0) * len(eig) * np.finfo(np.float64).eps] = 0.0
    tr_covmean = np.sqrt(eig).sum()
    diff = mu - mu_other
    return float(diff.dot(diff) + np.trace(sigma) + np.trace(sigma_other) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------


def _looks_like_probabilities(x: np.ndarray) -> bool:
    return bool((x >= 0).all() and (x <= 1).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in the logits' floating dtype (float32 for Inception logits, like TF's)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits_or_probs, split_size: int = 5000, from_logits: bool | None = None) -> float:
    """ADM's Inception Score: mean over sequential splits of exp(E_x KL(p(y|x) || p(y))).

    logits_or_probs: (N, K) logits (Inception: unbiased, K = 1008) or class probabilities.
    from_logits: True/False to say which; None decides: rows that are non-negative and sum to 1 are
    probabilities. Splits are consecutive slices of `split_size` rows; the last one may be shorter, and
    every split counts equally in the mean (ADM's rule).
    """
    x = np.asarray(logits_or_probs)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"expected a 2-D array (N, classes) of logits or probabilities, got shape {x.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("logits/probabilities contain NaN or inf")
    if from_logits is None:
        from_logits = not _looks_like_probabilities(x)
    probs = softmax(x) if from_logits else x
    if not from_logits and not _looks_like_probabilities(probs):
        raise ValueError("from_logits=False but the rows are not probability vectors (non-negative, sum 1)")

    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, 0)  # 0 log 0 = 0
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------
# Improved precision / recall
# ----------------------------------------------------------------------------------------------------


def _half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 and back (overflow becomes inf)."""
    return x.half().float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances (len(u), len(v)) float32, computed like ADM's TF graph on a GPU.

    First in float16 arithmetic (each op's result rounded to float16, sums accumulated in float32):
    max(((|u|^2 - 2 u.v) + |v|^2), 0). If any value of the block is not finite, the block is recomputed
    from the float32 inputs in float32 (ADM's tf.cond fallback).
    """
    u = u.float()
    v = v.float()
    u16, v16 = _half(u), _half(v)
    norm_u = _half(_half(u16 * u16).sum(1))  # tf.square in fp16, reduce_sum -> fp16
    norm_v = _half(_half(v16 * v16).sum(1))
    dots = _half(u16 @ v16.T)
    d16 = _half(_half(norm_u[:, None] - 2 * dots) + norm_v[None, :])
    if torch.isfinite(d16).all():
        return d16.clamp_min(0)
    d32 = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return d32.clamp_min(0)


def _check_features(name: str, feats, k: int) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{name} features must be 2-D (N, D), got shape {feats.shape}")
    if len(feats) < k + 1:
        raise ValueError(f"{name} set has {len(feats)} points; k={k} nearest neighbours need at least {k + 1}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return feats.astype(np.float32, copy=False)


def manifold_radii(
    feats, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000, device=None
) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set, float32 (N,).

    The point itself is among the candidates (distance ~0), so this is the (k+1)-th smallest value of its
    row, as in ADM. Rows and columns are processed in blocks; a running (k+1)-smallest keeps memory at
    one block.
    """
    feats = _check_features("feature", feats, k)
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = len(feats)
    radii = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, row_batch_size):
        rows = torch.from_numpy(feats[r0 : r0 + row_batch_size]).to(device)
        best = None  # (rows, <= k+1) smallest distances seen so far
        for c0 in range(0, n, col_batch_size):
            cols = torch.from_numpy(feats[c0 : c0 + col_batch_size]).to(device)
            d = pairwise_sq_distances(rows, cols)
            d = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + len(rows)] = best[:, k].cpu().numpy()
    return radii


def precision_recall(
    ref_feats,
    sample_feats,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    device=None,
) -> tuple[float, float]:
    """Improved precision and recall (k-NN balls) of samples against references, ADM's way.

    precision = fraction of samples within the k-NN ball (squared radius, <=) of at least one reference;
    recall = fraction of references within the k-NN ball of at least one sample. Distance blocks put
    references on rows and samples on columns, as ADM does; results do not depend on the block sizes
    (except through ADM's per-block float32 fallback, which only triggers on float16 overflow).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if row_batch_size < 1 or col_batch_size < 1:
        raise ValueError("row_batch_size and col_batch_size must be >= 1")
    ref = _check_features("reference", ref_feats, k)
    sam = _check_features("sample", sample_feats, k)
    if ref.shape[1] != sam.shape[1]:
        raise ValueError(f"feature widths differ: reference {ref.shape[1]}, sample {sam.shape[1]}")
    device = torch.device(device) if device is not None else torch.device("cpu")

    ref_radii = manifold_radii(ref, k, row_batch_size, col_batch_size, device)
    sam_radii = manifold_radii(sam, k, row_batch_size, col_batch_size, device)

    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)  # reference inside some sample ball
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)  # sample inside some reference ball
    for r0 in range(0, len(ref), row_batch_size):
        rows = torch.from_numpy(ref[r0 : r0 + row_batch_size]).to(device)
        r_ref = torch.from_numpy(ref_radii[r0 : r0 + row_batch_size]).to(device)
        for c0 in range(0, len(sam), col_batch_size):
            cols = torch.from_numpy(sam[c0 : c0 + col_batch_size]).to(device)
            r_sam = torch.from_numpy(sam_radii[c0 : c0 + col_batch_size]).to(device)
            d = pairwise_sq_distances(rows, cols)  # (rows, cols)
            ref_in[r0 : r0 + len(rows)] |= (d <= r_sam[None, :]).any(dim=1)
            sam_in[c0 : c0 + len(cols)] |= (d <= r_ref[:, None]).any(dim=0)
    precision = sam_in.double().mean().item()
    recall = ref_in.double().mean().item()
    return precision, recall
