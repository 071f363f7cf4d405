"""models/autoencoder.py and models/encoders.py on tiny random models, offline.

Values are checked against direct diffusers / timm calls and closed forms written here; the
real-weights code paths are exercised with random weights saved in the official formats
(a diffusers folder, an official DINOv2 .pth, a fake local torch.hub checkout).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.autoencoder import Autoencoder, fit_patch_pca  # noqa: E402
from models.encoders import (ENCODER_WIDTHS, build_encoder, load_encoders,  # noqa: E402
                             official_weights_name, parse_enc_types)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """random-tiny saved as a diffusers folder, like a local SD-VAE copy."""
    path = tmp_path_factory.mktemp("vae") / "sd-vae-ft-mse"
    Autoencoder.from_spec("random-tiny").vae.save_pretrained(str(path))
    return str(path)


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


#################################################################################
#                                 Autoencoder                                   #
#################################################################################

def test_identity_codec_closed_forms():
    ae = Autoencoder.from_spec("identity")
    assert (ae.latent_channels, ae.downsample, ae.scale, ae.bias) == (3, 1, 1.0, 0.0)
    x = _images()
    m = ae.encode_moments(x)
    assert m.shape == (2, 6, 32, 32) and m.dtype == torch.float32
    assert torch.equal(m[:, :3], x.float() / 127.5 - 1) and torch.equal(m[:, 3:], torch.zeros_like(m[:, 3:]))
    z = ae.sample(m, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, m[:, :3])                       # std 0: z = mean * 1 + 0
    assert torch.equal(ae.decode(z), z)
    back = Autoencoder.to_uint8(ae.decode(z))             # (N, H, W, 3)
    assert back.shape == (2, 32, 32, 3)
    assert (back.permute(0, 3, 1, 2).int() - x.int()).abs().max() <= 1   # truncation may lose one level


def test_to_uint8_is_the_release_truncation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    got = Autoencoder.to_uint8(x)[0, 0, :, 0].tolist()
    want = [int(np.floor(min(max(255.0 * (v + 1) / 2, 0), 255)))
            for v in [-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0]]
    assert got == want == [0, 0, 63, 127, 165, 254, 255, 255]


def test_random_tiny_matches_direct_diffusers_calls(tiny_vae_dir):
    ae = Autoencoder.from_spec("random-tiny")
    assert (ae.latent_channels, ae.downsample, ae.scale, ae.bias) == (4, 8, 0.18215, 0.0)
    x = _images(3)
    moments = ae.encode_moments(x)
    dist = ae.vae.encode(x.float() / 127.5 - 1).latent_dist
    assert moments.shape == (3, 8, 4, 4)
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1))

    gen = torch.Generator().manual_seed(7)
    z = ae.sample(moments, generator=gen)
    eps = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (moments[:, :4] + moments[:, 4:] * eps) * 0.18215)
    torch.testing.assert_close(ae.decode(z), ae.vae.decode(z / 0.18215).sample)

    # The same weights loaded by path give the same moments.
    loaded = Autoencoder.from_spec(tiny_vae_dir)
    assert loaded.spec == tiny_vae_dir
    torch.testing.assert_close(loaded.encode_moments(x), moments)


def test_random_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Autoencoder.from_spec("random-tiny")
    after = torch.rand(1)
    b = Autoencoder.from_spec("random-tiny")
    assert torch.equal(before, after)
    for pa, pb in zip(a.vae.parameters(), b.vae.parameters()):
        assert torch.equal(pa, pb)


def test_env_copy_stands_in_for_hub_id(tiny_vae_dir, monkeypatch):
    monkeypatch.setenv("REG_VAE_PATH", os.path.dirname(tiny_vae_dir))   # folder holding sd-vae-ft-mse/
    ae = Autoencoder.from_spec("mse")
    assert ae.spec == "mse" and ae.latent_channels == 4
    monkeypatch.setenv("REG_VAE_PATH", tiny_vae_dir)                     # the copy itself
    assert Autoencoder.from_spec("stabilityai/sd-vae-ft-ema").downsample == 8


def test_local_path_spec_is_recorded_absolute(tiny_vae_dir, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_vae_dir))
    ae = Autoencoder.from_spec(os.path.join(".", os.path.basename(tiny_vae_dir)))
    assert ae.spec == tiny_vae_dir          # rebuildable from any working directory


def test_autoencoder_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("REG_VAE_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="REG_VAE_PATH"):
        Autoencoder.from_spec("stabilityai/sd-vae-ft-mse")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Autoencoder.from_spec(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Autoencoder.from_spec(str(tmp_path / "empty"))
    monkeypatch.setenv("REG_VAE_PATH", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="REG_VAE_PATH"):
        Autoencoder.from_spec("mse")
    with pytest.raises(ValueError, match="non-empty"):
        Autoencoder.from_spec("")
    ae = Autoencoder.from_spec("identity")
    with pytest.raises(ValueError, match="uint8"):
        ae.encode_moments(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 6, h, w\)"):
        ae.sample(torch.zeros(1, 8, 4, 4))
    tiny = Autoencoder.from_spec("random-tiny")
    with pytest.raises(ValueError, match="divisible"):
        tiny.encode_moments(torch.zeros(1, 3, 12, 12, dtype=torch.uint8))


#################################################################################
#                                   Encoders                                    #
#################################################################################

def _blocky_images(n=6, size=32, f=8, seed=0):
    """Grey images made of constant f x f blocks: every patch is (v, ..., v), a rank-1 family."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 1, size // f, size // f), generator=g, dtype=torch.uint8)
    return small.repeat_interleave(f, 2).repeat_interleave(f, 3).expand(n, 3, size, size).contiguous()


def _save_pca(state, tmp_path, name="pca.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_pca_codec_is_exact_on_its_span_and_unit_variance(tmp_path):
    images = _blocky_images()
    state = fit_patch_pca([images[:3], images[3:]], factor=8, channels=1)   # streamed in two batches
    assert state["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    # The only direction is the constant patch, normalised: +1/sqrt(192) everywhere (sign fixed positive).
    torch.testing.assert_close(state["components"], torch.full((1, 192), 192 ** -0.5), atol=1e-6, rtol=0)
    ae = Autoencoder.from_spec("pca:" + _save_pca(state, tmp_path), device="cpu")
    assert (ae.latent_channels, ae.downsample, ae.bias) == (1, 8, 0.0)
    assert ae.spec == "pca:" + str(tmp_path / "pca.pt")                          # absolute, rebuildable
    moments = ae.encode_moments(images)                                          # (N, 2, 4, 4)
    assert moments.shape == (6, 2, 4, 4) and moments[:, 1:].abs().max() == 0     # std 0: deterministic
    z = ae.sample(moments)
    # scale makes the fitted data's latents unit-variance (population variance, the mean is 0).
    assert float(z.pow(2).mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-5)
    back = ae.decode(z)
    torch.testing.assert_close(back, images.float() / 127.5 - 1, atol=1e-5, rtol=0)
    assert torch.equal(Autoencoder.to_uint8(back + 1e-4), images.permute(0, 2, 3, 1))


def test_pca_codec_matches_numpy_pca(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8)
    state = fit_patch_pca([images], factor=4, channels=5)
    x = images.double().numpy() / 127.5 - 1
    patches = x.reshape(5, 3, 4, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 48)   # pixel_unshuffle order
    centred = patches - patches.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    comps = state["components"].double().numpy()
    np.testing.assert_allclose(comps @ comps.T, np.eye(5), atol=1e-5)            # orthonormal rows
    # Same subspace as numpy's top-5 right singular vectors (signs are a convention).
    np.testing.assert_allclose(np.abs(comps @ vt[:5].T), np.eye(5), atol=1e-4)
    ev = sv ** 2 / len(patches)
    assert state["explained_variance"] == pytest.approx(ev[:5].sum() / ev.sum(), rel=1e-5)
    assert state["scale"] == pytest.approx((ev[:5].mean()) ** -0.5, rel=1e-5)


def test_pca_codec_bad_input(tmp_path):
    with pytest.raises(ValueError, match="between 1 and 3\\*factor"):
        fit_patch_pca([_blocky_images()], factor=8, channels=193)
    with pytest.raises(ValueError, match="not divisible by --factor 5"):
        fit_patch_pca([_blocky_images()], factor=5, channels=1)
    with pytest.raises(ValueError, match="no images"):
        fit_patch_pca([], factor=8, channels=1)
    with pytest.raises(FileNotFoundError, match="fit-pca"):
        Autoencoder.from_spec("pca:" + str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not a PCA codec file"):
        Autoencoder.from_spec("pca:" + _save_pca({"kind": "something-else"}, tmp_path, "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read the PCA codec file"):
        Autoencoder.from_spec("pca:" + str(tmp_path / "junk.pt"))


def test_parse_enc_types():
    assert parse_enc_types("dinov2-vit-b,dinov2-vit-l-reg") == ["dinov2-vit-b", "dinov2-vit-l-reg"]
    assert parse_enc_types(["random-vit-tiny"]) == ["random-vit-tiny"]
    assert ENCODER_WIDTHS["dinov2-vit-b"] == 768 and ENCODER_WIDTHS["dinov2-vit-g-reg"] == 1536
    with pytest.raises(ValueError, match="choose from"):
        parse_enc_types("clip-vit-Q")
    with pytest.raises(ValueError, match="twice"):
        parse_enc_types("dinov2-vit-b,dinov2-vit-b")
    with pytest.raises(ValueError, match="no encoder"):
        parse_enc_types("")


def _reference_preprocess(images, resolution):
    """Spec section 3, written out: x/255, ImageNet mean/std, bicubic to 224 * R / 256."""
    x = images.float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    size = 224 * resolution // 256
    return F.interpolate((x - mean) / std, size=(size, size), mode="bicubic", align_corners=False)


@pytest.mark.parametrize("name,resolution", [("random-vit-tiny", 32), ("random-vit-tiny-reg", 64)])
def test_random_encoder_preprocessing_and_tokens(name, resolution):
    enc = load_encoders(name, resolution)[0]
    assert enc.num_tokens == 1 + (16 * resolution // 256) ** 2 and enc.embed_dim == 64
    x = _images(3, resolution)
    torch.testing.assert_close(enc.preprocess(x), _reference_preprocess(x, resolution))
    cls, tokens = enc(x)
    assert cls.shape == (3, 64) and tokens.shape == (3, enc.num_tokens, 64)
    # Tokens = [class, patches]: registers (4 for -reg) are dropped.
    full = enc.backbone.forward_features(_reference_preprocess(x, resolution))
    prefix = 5 if name.endswith("-reg") else 1
    torch.testing.assert_close(tokens, torch.cat([full[:, :1], full[:, prefix:]], 1))
    torch.testing.assert_close(cls, tokens[:, 0])
    assert not torch.allclose(cls[0], cls[1])                  # depends on the image
    # Frozen and reproducible.
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    again = build_encoder(name, resolution)
    torch.testing.assert_close(again(x)[0], cls)


def _official_state_dict(timm_name, width, registers=0):
    """Random weights with the official DINOv2 .pth keys and shapes (518 px -> 37x37 pos_embed)."""
    import timm
    with torch.device("meta"):
        m = timm.create_model(timm_name, img_size=518, num_classes=0)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in m.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, width)
    if registers:   # official format: class pos row included, registers separate
        sd["register_tokens"] = torch.randn(1, registers, width, generator=g) * 0.02
        sd.pop("reg_token", None)
        sd["pos_embed"] = torch.randn(1, 1 + 37 * 37, width, generator=g) * 0.02
    return sd


def test_local_official_weights_file(tmp_path, monkeypatch):
    import timm
    from timm.layers import resample_abs_pos_embed

    sd = _official_state_dict("vit_small_patch14_dinov2", 384)
    path = tmp_path / official_weights_name("dinov2-vit-s")
    torch.save(sd, path)
    enc = load_encoders(["dinov2-vit-s"], 32, local_paths={"dinov2-vit-s": str(path)})[0]
    # 37x37 resampled to the 2x2 grid of 32 px images (224 * 32/256 = 28 px, patch 14).
    expect_pos = resample_abs_pos_embed(sd["pos_embed"], [2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(enc.backbone.pos_embed.data, expect_pos)
    # Independent forward: timm's own model at 28 px, weights put in by hand.
    with torch.device("meta"):
        ref = timm.create_model("vit_small_patch14_dinov2", img_size=28, num_classes=0).eval()
    ref_sd = {k: v for k, v in sd.items() if k != "mask_token"}
    ref_sd["pos_embed"] = expect_pos
    ref.load_state_dict(ref_sd, assign=True)
    x = _images(2)
    out = ref.forward_features(_reference_preprocess(x, 32))
    cls, tokens = enc(x)
    torch.testing.assert_close(cls, out[:, 0])
    torch.testing.assert_close(tokens, out)

    # Same file found through REG_DINOV2_WEIGHTS (a folder of official names).
    monkeypatch.setenv("REG_DINOV2_WEIGHTS", str(tmp_path))
    torch.testing.assert_close(load_encoders("dinov2-vit-s", 32)[0](x)[0], cls)
    # Wrong size for the name: a clear error, not a state_dict dump.
    with pytest.raises(ValueError, match="does not fit encoder 'dinov2-vit-b'"):
        load_encoders(["dinov2-vit-b"], 32, local_paths={"dinov2-vit-b": str(path)})


def test_local_official_weights_with_registers(tmp_path):
    sd = _official_state_dict("vit_small_patch14_reg4_dinov2", 384, registers=4)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    enc = load_encoders(["dinov2-vit-s-reg"], 32, local_paths={"dinov2-vit-s-reg": str(path)})[0]
    assert enc.backbone.num_prefix_tokens == 5
    cls, tokens = enc(_images(2))
    assert tokens.shape == (2, 5, 384)
    # The official class token is stored without its position row; timm folds it in.
    torch.testing.assert_close(enc.backbone.cls_token.data, sd["cls_token"] + sd["pos_embed"][:, 0])


HUBCONF = '''
import torch, torch.nn as nn

class FakeDino(nn.Module):
    """Stands in for a hub DINOv2: forward_features returns the hub's dict of tokens."""
    def __init__(self, width):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.linspace(-1, 1, (1 + 37 * 37) * width).view(1, 1 + 37 * 37, width))
        self.head = nn.Linear(width, 3)
        self.width = width

    def forward_features(self, x):
        n = x.shape[0]
        pooled = nn.functional.avg_pool2d(x, 14)                     # (N, 3, g, g)
        patches = pooled.flatten(2).transpose(1, 2).repeat(1, 1, self.width // 3)
        cls = x.mean((2, 3)).repeat(1, self.width // 3)
        return {"x_norm_clstoken": cls, "x_norm_patchtokens": patches, "x_norm_regtokens": None}

def dinov2_vits14(pretrained=True, **kwargs):
    if {fail}:
        raise RuntimeError("Unable to download weights: network unreachable")
    return FakeDino(384)
'''


def test_hub_checkout_path(tmp_path, monkeypatch):
    from timm.layers import resample_abs_pos_embed

    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF.replace("{fail}", "False"))
    monkeypatch.setenv("REG_DINOV2_REPO", str(repo))
    monkeypatch.delenv("REG_DINOV2_WEIGHTS", raising=False)
    enc = load_encoders("dinov2-vit-s", 64)[0]          # 64 px -> 56 px input -> 4x4 patches
    assert enc.backend == "hub" and isinstance(enc.backbone.head, torch.nn.Identity)
    assert enc.backbone.pos_embed.shape == (1, 17, 384)
    torch.testing.assert_close(enc.backbone.pos_embed.data,
                               resample_abs_pos_embed(torch.linspace(-1, 1, 1370 * 384).view(1, 1370, 384), [4, 4]))
    x = _images(2, 64)
    cls, tokens = enc(x)
    pre = _reference_preprocess(x, 64)
    torch.testing.assert_close(cls, pre.mean((2, 3)).repeat(1, 128))
    torch.testing.assert_close(tokens[:, 1:], F.avg_pool2d(pre, 14).flatten(2).transpose(1, 2).repeat(1, 1, 128))
    # The same checkout given as a local path.
    monkeypatch.delenv("REG_DINOV2_REPO")
    enc2 = load_encoders(["dinov2-vit-s"], 64, local_paths={"dinov2-vit-s": str(repo)})[0]
    assert enc2.backend == "hub"


def test_encoder_missing_weights_and_bad_input(tmp_path, monkeypatch):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF.replace("{fail}", "True"))
    monkeypatch.setenv("REG_DINOV2_REPO", str(repo))
    monkeypatch.delenv("REG_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth.*REG_DINOV2_REPO|REG_DINOV2_WEIGHTS") as e:
        load_encoders("dinov2-vit-s", 256)
    # train.py has no --enc-weights: the message names the variable, and the flag only for dataset_tools.py
    assert "--enc-weights" not in str(e.value).replace("dataset_tools.py also takes --enc-weights", "")
    monkeypatch.setenv("REG_DINOV2_REPO", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no hubconf.py"):
        load_encoders("dinov2-vit-s", 256)
    with pytest.raises(FileNotFoundError, match="not found at"):
        load_encoders(["dinov2-vit-b"], 256, local_paths={"dinov2-vit-b": str(tmp_path / "x.pth")})
    monkeypatch.setenv("REG_DINOV2_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="REG_DINOV2_WEIGHTS"):
        load_encoders("dinov2-vit-b", 256)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoders("random-vit-tiny", 40)
    with pytest.raises(ValueError, match="not requested"):
        load_encoders("random-vit-tiny", 32, local_paths={"dinov2-vit-b": "x"})
    enc = load_encoders("random-vit-tiny", 32)[0]
    with pytest.raises(ValueError, match="built for 32x32"):
        enc(_images(1, 64))
