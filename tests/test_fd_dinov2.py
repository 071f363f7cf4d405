"""FD-DINOv2 (evaluations/fd_dinov2.py), EDM2's metric.

Checked once against EDM2's calculate_metrics.py running DINOv2's own hub code on the same random
ViT-L/14 weights (README: equal features and FD); these tests need neither."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from evaluations import fd_dinov2 as fd


def test_statistics_are_float64_mean_and_unbiased_covariance():
    acts = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32) * 3 + 1
    mu, sigma = fd.statistics(acts)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        fd.statistics(acts[:1])


def test_distance_on_fixed_activations():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1 + 4 + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2)
    assert fd.fd_dinov2((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(want, rel=1e-12)
    # EDM2's formula, written out, on correlated activations
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    (m1, s1), (m2, s2) = fd.statistics(x), fd.statistics(y)
    root = linalg.sqrtm(s1 @ s2)
    edm2 = float(np.real(np.square(m1 - m2).sum() + np.trace(s1 + s2 - root * 2)))
    assert fd.fd_dinov2((m1, s1), (m2, s2)) == pytest.approx(edm2, rel=1e-10)


def _bicubic_1d_matrix(m: int, n: int, scale: float) -> np.ndarray:
    """(n, m) interpolation matrix of PyTorch's bicubic (A = -0.75, half-pixel centres, edge clamp)
    when called with scale_factor=scale: source x = (i + 0.5) / scale - 0.5."""
    def k(t):
        t, a = abs(t), -0.75
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0
    w = np.zeros((n, m))
    for i in range(n):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for j in range(x0 - 1, x0 + 3):
            w[i, min(max(j, 0), m - 1)] += k(x - j)
    return w


def test_position_table_interpolated_as_dinov2_hub():
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    out = fd.interpolate_pos_embed(pe, 16)
    assert out.shape == (1, 1 + 256, 8) and torch.equal(out[:, 0], pe[:, 0])
    w = _bicubic_1d_matrix(37, 16, 16.1 / 37)                         # the hub's offset 0.1
    grid = pe[0, 1:].reshape(37, 37, 8).double().numpy()
    want = np.einsum("ir,rcd,jc->ijd", w, grid, w).reshape(256, 8)
    np.testing.assert_allclose(out[0, 1:].numpy(), want, rtol=0, atol=2e-5)
    plain = F.interpolate(pe[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert (plain.permute(0, 2, 3, 1).reshape(1, 256, 8) - out[:, 1:]).abs().max() > 1e-3   # the offset matters
    assert fd.interpolate_pos_embed(pe, 37) is pe


@pytest.fixture(scope="module")
def tiny_vit_l():
    """The ViT-L/14 layout (width 1024, 16 heads, patch 14, 37x37 table) at depth 1, random weights."""
    torch.manual_seed(0)
    vit = fd.vit_l14(depth=1)
    with torch.no_grad():
        vit.blocks[0].ls1.gamma.fill_(0.5)
        vit.blocks[0].ls2.gamma.fill_(0.5)
        vit.pos_embed.normal_()
    return vit


def test_features_end_to_end(tiny_vit_l):
    from timm.models.vision_transformer import VisionTransformer

    det = fd.DINOv2Features(tiny_vit_l)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 48), dtype=np.uint8))
    feats = det(images)
    assert feats.shape == (2, 1024) and feats.dtype == torch.float32
    # preprocessing, written out: bicubic+antialias on 0..255, then /255 and ImageNet mean/std
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor(fd.MEAN).view(1, 3, 1, 1)) / torch.tensor(fd.STD).view(1, 3, 1, 1)
    torch.testing.assert_close(det.preprocess(images), x, rtol=0, atol=0)
    # network: timm's own forward at 224 px with the hub-interpolated table; class token after the norm
    ref = VisionTransformer(img_size=224, patch_size=14, embed_dim=1024, depth=1, num_heads=16, init_values=1e-5,
                            num_classes=0)
    sd = dict(tiny_vit_l.state_dict())
    sd["pos_embed"] = fd.interpolate_pos_embed(sd["pos_embed"], 16)
    ref.load_state_dict(sd)
    with torch.no_grad():
        want = ref.eval().forward_features(x)[:, 0]
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-4)
    # the NHWC path gives the same features
    np.testing.assert_allclose(det.nhwc(images.permute(0, 2, 3, 1).numpy()), feats.numpy(), atol=1e-5)


def test_reference_statistics_cached_by_weights(tmp_path):
    torch.manual_seed(0)
    det = fd.DINOv2Features(fd.vit_l14(depth=1, width=64, heads=2))   # the cache does not need ViT-L
    calls = []
    nhwc = det.nhwc
    det.nhwc = lambda images, bs=64: calls.append(len(images)) or nhwc(images, bs)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images)
    mu, sigma = fd.reference_statistics(det, ref, "a" * 64)
    assert fd.cache_path(ref) == tmp_path / "ref.fd_dinov2.npz" and fd.cache_path(ref).is_file()
    mu2, sigma2 = fd.reference_statistics(det, ref, "a" * 64)
    assert calls == [3] and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    fd.reference_statistics(det, ref, "b" * 64)                         # other weights: recomputed
    assert calls == [3, 3]
    # an image folder gives the same statistics, cached beside it
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    mu3, sigma3 = fd.reference_statistics(det, folder, "a" * 64)
    assert (tmp_path / "images.fd_dinov2.npz").is_file()
    np.testing.assert_allclose(mu3, mu, atol=1e-12)
    np.testing.assert_allclose(sigma3, sigma, atol=1e-10)
    Image.fromarray(images[0][:16]).save(folder / "odd.png")
    with pytest.raises(ValueError, match="odd.png is not 32x32"):
        fd.reference_statistics(det, folder, "a" * 64)


def test_missing_weights_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv(fd.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"REG_FD_DINOV2_WEIGHTS") as e:
        fd.resolve_weights()
    assert "\n" not in str(e.value) and fd.WEIGHTS_NAME in str(e.value)
    monkeypatch.setenv(fd.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fd.resolve_weights()


@pytest.mark.slow
def test_full_vit_l14_official_layout_round_trip(tmp_path):
    """The full ViT-L/14 config: random weights written in DINOv2's official layout load strictly."""
    from models.encoders import save_official_layout

    torch.manual_seed(0)
    vit = fd.vit_l14()
    assert sum(p.numel() for p in vit.parameters()) == pytest.approx(304.4e6, rel=1e-3)
    path = save_official_layout(vit, str(tmp_path / fd.WEIGHTS_NAME))
    det = fd.DINOv2Features.from_weights(path)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8))
    torch.testing.assert_close(det(images), fd.DINOv2Features(vit)(images), rtol=0, atol=0)


def test_evaluator_and_online_metric_report_fd_dinov2(tmp_path, monkeypatch):
    """The evaluator adds FD-DINOv2 beside ADM's numbers, from the same npz; --fid-metric fd_dinov2
    builds the same metric. (A small ViT stands in for ViT-L/14: the wiring is what is tested.)"""
    import argparse

    from evaluations import evaluator, inception
    import online_eval

    torch.manual_seed(0)
    vit = fd.vit_l14(depth=1, width=64, heads=2)
    monkeypatch.setattr(fd, "load_vit_l14", lambda weights: vit)
    weights = tmp_path / fd.WEIGHTS_NAME
    weights.write_bytes(b"stand-in")
    rng = np.random.default_rng(0)
    ref, sample = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "sample.npz", arr_0=sample)
    incep = tmp_path / "inception.pth"                                 # Inception stubbed: not under test here
    incep.write_bytes(b"stand-in")

    class StubInception:
        def __init__(self, weights, device):
            pass

        def __call__(self, images):
            x = np.asarray(images, np.float64).reshape(len(images), -1)[:, :64]
            rep = lambda d: np.resize(x, (len(x), d)).astype(np.float32) / 255   # noqa: E731
            return {"pool": rep(inception.POOL_DIM), "spatial": rep(inception.SPATIAL_DIM),
                    "logits": rep(inception.NUM_LOGITS)}
    monkeypatch.setattr(inception, "InceptionFeatures", StubInception)
    det = fd.DINOv2Features(vit)
    want = fd.fd_dinov2(fd.statistics(det.nhwc(sample)), fd.statistics(det.nhwc(ref)))
    details = {}
    got = evaluator.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", incep, device="cpu", fid_method="lowrank",
                             details=details, fd_dinov2_weights=str(weights))
    assert {"fid", "sfid", "inception_score", "precision", "recall"} < got.keys()
    assert got["fd_dinov2"] == pytest.approx(want, rel=1e-9) and want > 0
    assert details["fd_dinov2_weights_sha256"] == evaluator.file_sha256(weights)
    assert (tmp_path / "ref.fd_dinov2.npz").is_file()
    monkeypatch.delenv(fd.WEIGHTS_ENV, raising=False)                  # off without weights
    assert "fd_dinov2" not in evaluator.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", incep, device="cpu",
                                                 fid_method="lowrank")
    # in training: --fid-metric fd_dinov2 (weights from the env variable), activations gathered per process
    monkeypatch.setenv(fd.WEIGHTS_ENV, str(weights))
    metric = online_eval.build_metric(argparse.Namespace(fid_metric="fd_dinov2", fid_ref=str(tmp_path / "ref.npz")), "cpu")
    parts = [metric.activations(sample[:2]), metric.activations(sample[2:])]
    assert metric.metrics_from_activations(parts)["fd_dinov2"] == pytest.approx(want, rel=1e-9)
