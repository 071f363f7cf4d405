"""evaluations.metrics: FID, Inception Score and precision/recall against closed forms and hand-solved sets."""

import warnings

import numpy as np
import pytest
import torch

from evaluations import metrics

# ----------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------


def _random_cov(rng, d, n=None):
    x = rng.standard_normal((n or 3 * d, d))
    return x.T @ x / len(x)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_invariant_under_common_rotation():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    base = metrics.frechet_distance(mu1, s1, mu2, s2)
    rotated = metrics.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert base > 0.5
    assert rotated == pytest.approx(base, rel=1e-8)


def test_frechet_identical_statistics_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    mu, s = rng.standard_normal(10), _random_cov(rng, 10)
    assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-8
    s2 = _random_cov(rng, 10)
    forward, backward = metrics.frechet_distance(mu, s, mu + 1, s2), metrics.frechet_distance(mu + 1, s2, mu, s)
    assert forward == pytest.approx(backward, rel=1e-8)


def test_frechet_singular_product_gives_rank_one_closed_form():
    # sigma1 = u u^T, sigma2 = w w^T: sigma1 sigma2 has the single eigenvalue (u.w)^2 = 9, so
    # tr sqrt = 3 and FID = |u|^2 + |w|^2 - 6 = 1. scipy's sqrtm fails on this singular product,
    # so ADM's +1e-6 fallback is what produces the (approximately) right answer here.
    u, w = np.array([-1.0, -1, 1, 1]), np.array([-1.0, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = metrics.frechet_distance(np.zeros(4), np.outer(u, u), np.zeros(4), np.outer(w, w))
    assert got == pytest.approx(1.0, abs=1e-2)


def test_frechet_fallback_adds_eps_to_both_diagonals(monkeypatch):
    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, 4), _random_cov(rng, 4)
    seen = []
    real_sqrtm = metrics._sqrtm

    def fake_sqrtm(m):
        seen.append(m.copy())
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics, "_sqrtm", fake_sqrtm)
    with pytest.warns(UserWarning, match="not finite"):
        got = metrics.frechet_distance(np.zeros(4), s1, np.zeros(4), s2, eps=0.5)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[1], (s1 + 0.5 * np.eye(4)) @ (s2 + 0.5 * np.eye(4)))
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm(seen[1]).real)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_imaginary_parts(monkeypatch):
    # A negative "variance" has an imaginary square root: ADM refuses it.
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    # Rounding-level imaginary parts are dropped (real part used).
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.eye(2) * 2 + 1e-6j)
    assert metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(2 + 2 - 2 * 4)


def test_frechet_shape_errors():
    with pytest.raises(ValueError, match="same length"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_activation_statistics_dtypes_and_values():
    rng = np.random.default_rng(4)
    acts = rng.standard_normal((20, 5)).astype(np.float32)
    mu, sigma = metrics.activation_statistics(acts)
    assert mu.dtype == np.float32 and sigma.dtype == np.float64  # ADM: mean in float32, np.cov in float64
    a64 = acts.astype(np.float64)
    centred = a64 - a64.mean(0)
    np.testing.assert_allclose(mu, a64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, centred.T @ centred / 19, rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.activation_statistics(acts[:1])
    with pytest.raises(ValueError, match="2-D"):
        metrics.activation_statistics(acts[0])


def test_lowrank_fid_matches_adm_when_full_rank_and_nuclear_norm_when_not():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((60, 6)), rng.standard_normal((50, 6)) * 1.5 + 0.3
    (mx, sx), (my, sy) = metrics.activation_statistics(x), metrics.activation_statistics(y)
    assert metrics.frechet_distance_from_activations(x, my, sy) == pytest.approx(
        metrics.frechet_distance(mx, sx, my, sy), rel=1e-9
    )
    # N < D: tr sqrtm(sx sy) is the nuclear norm of A B^T (A, B the scaled centred activations).
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((7, 12))
    (mx, sx), (my, sy) = metrics.activation_statistics(x), metrics.activation_statistics(y)
    a = (x - x.mean(0)) / np.sqrt(4)
    b = (y - y.mean(0)) / np.sqrt(6)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    expected = np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2 * nuclear
    assert metrics.frechet_distance_from_activations(x, my, sy) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="match"):
        metrics.frechet_distance_from_activations(x, my[:3], sy)


# ----------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------


def test_inception_score_uniform_is_one():
    assert metrics.inception_score(np.full((12, 10), 0.1)) == pytest.approx(1.0, abs=1e-9)
    assert metrics.inception_score(np.zeros((12, 10), dtype=np.float32)) == pytest.approx(1.0, abs=1e-6)  # logits


def test_inception_score_one_hot_over_k_classes_is_k():
    k = 4
    probs = np.eye(10)[np.arange(20) % k]  # (20, 10), each of 4 classes 5 times
    assert metrics.inception_score(probs) == pytest.approx(k, rel=1e-12)


def test_inception_score_sequential_splits_with_short_last_split():
    # 7 rows, splits of 5: rows 0-4 one-hot over 5 classes (score 5), rows 5-6 over 2 classes (score 2).
    probs = np.eye(6)[[0, 1, 2, 3, 4, 0, 1]]
    assert metrics.inception_score(probs, split_size=5) == pytest.approx((5 + 2) / 2, rel=1e-12)
    # One split over all rows instead: exp(entropy of the class marginal).
    m = np.array([2, 2, 1, 1, 1]) / 7
    assert metrics.inception_score(probs, split_size=7) == pytest.approx(np.exp(-(m * np.log(m)).sum()), rel=1e-12)


def test_inception_score_from_logits_matches_naive_formula():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((11, 8)).astype(np.float32) * 3
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    naive = []
    for part in (p[:4], p[4:8], p[8:]):
        marginal = part.mean(0)
        naive.append(np.exp(np.mean([np.sum(r * np.log(r / marginal)) for r in part])))
    got = metrics.inception_score(logits, split_size=4)
    assert got == pytest.approx(np.mean(naive), rel=1e-5)
    assert metrics.inception_score(logits + 7.0, split_size=4) == pytest.approx(got, rel=1e-5)  # shift-invariant
    assert metrics.inception_score(p, split_size=4, from_logits=False) == pytest.approx(np.mean(naive), rel=1e-12)


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        metrics.inception_score(np.ones(5))
    with pytest.raises(ValueError, match="not probability"):
        metrics.inception_score(np.ones((3, 4)), from_logits=False)
    with pytest.raises(ValueError, match="NaN"):
        metrics.inception_score(np.full((3, 4), np.nan))


# ----------------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------------


def _line(*xs):
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def test_precision_recall_by_hand_k1():
    # ref 0,1,3,10,40 -> 1-NN squared radii 1,1,4,49,900; samples 0.5,5,20 -> radii 20.25,20.25,225.
    # precision: 0.5 in ball(0); 5 on the boundary of ball(3) (d=4 <= 4); 20 in ball(40) (400 <= 900) -> 1.
    # recall: 0,1,3 in ball(0.5 or 5); 10 in ball(20) (100 <= 225); 40 in none (400 > 225) -> 4/5.
    ref, sam = _line(0, 1, 3, 10, 40), _line(0.5, 5, 20)
    assert metrics.precision_recall(ref, sam, k=1) == (1.0, 0.8)
    np.testing.assert_array_equal(metrics.manifold_radii(ref, k=1), [1, 1, 4, 49, 900])


def test_precision_recall_by_hand_k3():
    # ref 0,1,2,3,10 -> 3-NN radii 9,4,4,9,81. samples 5 (4 <= 9 from 3), -3 (9 <= 9 from 0),
    # 13 (9 <= 81 from 10) are in; 20 (100 > 81) and -4 (16 > 9, 25 > 4, ...) are out -> precision 3/5.
    ref, sam = _line(0, 1, 2, 3, 10), _line(5, -3, 20, 13, -4)
    np.testing.assert_array_equal(metrics.manifold_radii(ref, k=3), [9, 4, 4, 9, 81])
    precision, recall = metrics.precision_recall(ref, sam)
    assert precision == 0.6 and recall == 1.0


def _brute_force_pr(ref, sam, k):
    def radii(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((ref[:, None, :] - sam[None, :, :]) ** 2).sum(-1)  # (ref, sam)
    precision = (d <= radii(ref)[:, None]).any(0).mean()
    recall = (d <= radii(sam)[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("row,col", [(1, 1), (2, 5), (7, 3), (10000, 10000)])
def test_precision_recall_matches_brute_force_for_any_block_size(row, col):
    # Small integers: every float16 operation is exact, so the emulation equals exact arithmetic.
    rng = np.random.default_rng(7)
    ref = rng.integers(-4, 5, (23, 6)).astype(np.float32)
    sam = (rng.integers(-4, 5, (17, 6)) + rng.integers(0, 2, (17, 6))).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), sam.astype(np.float64), 3)
    got = metrics.precision_recall(ref, sam, k=3, row_batch_size=row, col_batch_size=col)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 or 0 < got[1] < 1  # the sets are not trivially nested


def test_pairwise_distances_emulate_float16_and_fall_back_to_float32():
    # 1 + 2^-11 rounds to 1 in float16, so ADM's distance is 0, not 2^-22.
    d = metrics.pairwise_sq_distances(torch.tensor([[1.0]]), torch.tensor([[1.0 + 2**-11]]))
    assert d.item() == 0.0
    # |u|^2 = 90000 overflows float16 -> the whole block is recomputed in float32.
    d = metrics.pairwise_sq_distances(torch.tensor([[300.0], [1.0]]), torch.tensor([[0.0]]))
    assert d[:, 0].tolist() == [90000.0, 1.0]
    # Against numpy float16 arithmetic (per-op rounding) on generic data.
    rng = np.random.default_rng(8)
    u, v = rng.standard_normal((9, 32)).astype(np.float32), rng.standard_normal((5, 32)).astype(np.float32)
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)
    nv = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)
    dots = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    ref = np.maximum((nu[:, None] - np.float16(2) * dots) + nv[None, :], np.float16(0)).astype(np.float32)
    got = metrics.pairwise_sq_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, ref)


def test_precision_recall_bad_input():
    ref = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="at least 4"):
        metrics.precision_recall(ref, ref[:3])
    with pytest.raises(ValueError, match="widths"):
        metrics.precision_recall(ref, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        metrics.precision_recall(ref[0], ref)
