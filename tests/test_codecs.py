"""Codec identities, the decoder choice, and a non-SD AutoencoderKL end to end (offline).

The SD-VAE stand-in is the 4-channel /8 random-tiny AutoencoderKL (SD-VAE's latent layout and
scale) saved under SD-VAE's folder names; the non-SD one is a 32-channel /16 AutoencoderKL with
its own scaling_factor and shift_factor.
"""
from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import REGDataset
from models.autoencoder import SD_VAE_SCALE, Autoencoder, codec_identity, decoder_for, fit_patch_pca
from preprocessing import dataset_tools as dt

SCALE32, SHIFT32 = 0.5, 0.1
pytestmark = pytest.mark.usefixtures("single_thread")   # tiny tensors: one thread is faster


def _save_tiny_sd(folder):
    Autoencoder.from_spec("random-tiny").vae.save_pretrained(str(folder))
    return str(folder)


def _vae32():
    """32 latent channels, /16 (5 blocks), its own scale and shift: not an SD-VAE."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=32,
                             down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                             block_out_channels=(8,) * 5, layers_per_block=1, norm_num_groups=4, sample_size=64,
                             scaling_factor=SCALE32, shift_factor=SHIFT32)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    hub = root / "hub"                                  # a REG_VAE_PATH folder: one copy per hub id
    paths = {"mse": _save_tiny_sd(hub / "sd-vae-ft-mse"), "ema": _save_tiny_sd(hub / "sd-vae-ft-ema"),
             "hub": str(hub)}
    _vae32().save_pretrained(str(root / "vae32"))
    paths["vae32"] = str(root / "vae32")
    return paths


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("REG_VAE_PATH", raising=False)


#################################################################################
#                                   Identity                                    #
#################################################################################

def test_identity_of_each_codec_round_trips(vaes, tmp_path, monkeypatch):
    state = fit_patch_pca([torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)], factor=4, channels=3)
    torch.save(state, tmp_path / "pca.pt")
    monkeypatch.setenv("REG_VAE_PATH", vaes["hub"])
    want = {
        "identity-f4": dict(family="identity", latent_channels=48, downsample=4, scale=1.0, bias=0.0),
        "random-tiny": dict(family="random-tiny", latent_channels=4, downsample=8, scale=SD_VAE_SCALE, bias=0.0),
        f"pca:{tmp_path / 'pca.pt'}": dict(family="pca", latent_channels=3, downsample=4, bias=0.0,
                                          source=str(tmp_path / "pca.pt")),
        "mse": dict(family="sd-vae", variant="ft-mse", source="stabilityai/sd-vae-ft-mse", latent_channels=4,
                    downsample=8, scale=SD_VAE_SCALE, bias=0.0),
        vaes["mse"]: dict(family="sd-vae", variant="ft-mse", source=vaes["mse"], spec=vaes["mse"]),
        vaes["ema"]: dict(family="sd-vae", variant="ft-ema", source=vaes["ema"]),
        vaes["vae32"]: dict(family="autoencoder-kl", variant=None, latent_channels=32, downsample=16,
                            scale=SCALE32, bias=-SHIFT32 * SCALE32),
    }
    for spec, facts in want.items():
        ae = Autoencoder.from_spec(spec)
        ident = ae.identity
        assert {k: ident[k] for k in facts} == facts, spec
        assert json.loads(json.dumps(ident)) == ident                      # a manifest field
        assert codec_identity(spec) == ident, spec                         # the same without loading
        assert Autoencoder.from_spec(ident["spec"]).identity == ident      # rebuilds the same codec
    # No loading at all for hub ids: what the release's latents were made with.
    assert codec_identity(None) == codec_identity("stabilityai/sd-vae-ft-mse")
    assert codec_identity("ema")["variant"] == "ft-ema"
    assert codec_identity("someone/other-vae")["family"] == "autoencoder-kl"


def test_shift_factor_follows_diffusers(vaes):
    """z = (latent - shift_factor) * scaling_factor; decode inverts it."""
    ae = Autoencoder.from_spec(vaes["vae32"])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    m = ae.encode_moments(x)
    assert m.shape == (2, 64, 2, 2)
    z = ae.sample(m, generator=torch.Generator().manual_seed(3))
    eps = torch.randn((2, 32, 2, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (m[:, :32] + m[:, 32:] * eps - SHIFT32) * SCALE32)
    torch.testing.assert_close(ae.decode(z), ae.vae.decode(z / SCALE32 + SHIFT32).sample)


def test_per_channel_latent_statistics_are_refused(tmp_path):
    vae = _vae32()
    vae.register_to_config(latents_mean=[0.0] * 32, latents_std=[1.0] * 32)
    vae.save_pretrained(str(tmp_path / "v"))
    with pytest.raises(ValueError, match="per channel"):
        Autoencoder.from_spec(str(tmp_path / "v"))


#################################################################################
#                                Decoder choice                                 #
#################################################################################

def test_decoder_choice_table(vaes, tmp_path):
    pca = f"pca:{tmp_path / 'p.pt'}"
    torch.save(fit_patch_pca([torch.zeros(1, 3, 8, 8, dtype=torch.uint8) + 7], factor=4, channels=1), tmp_path / "p.pt")
    table = [
        # (latents made by, --vae, --vae-path) -> decoder
        ((None, None, None), "ema"),                                     # release latents
        (("stabilityai/sd-vae-ft-mse", None, None), "ema"),              # hub mse -> EMA decoder
        (("mse", None, None), "ema"),
        ((vaes["mse"], None, None), "ema"),                              # local copy of mse -> EMA decoder
        ((vaes["mse"], "mse", None), "mse"),                             # --vae mse
        (("mse", "ema", None), "ema"),
        ((vaes["ema"], None, None), vaes["ema"]),                        # a local EMA copy decodes itself
        (("mse", None, vaes["ema"]), vaes["ema"]),                       # --vae-path
        ((vaes["vae32"], None, None), vaes["vae32"]),                    # other VAEs: themselves
        (("someone/other-vae", None, None), "someone/other-vae"),
        ((pca, None, None), pca),
        (("identity-f8", None, None), "identity-f8"),
        (("random-tiny", None, None), "random-tiny"),
    ]
    for (made_by, vae, vae_path), want in table:
        assert decoder_for(made_by, vae=vae, vae_path=vae_path) == want, (made_by, vae, vae_path)
        if made_by is not None:             # an identity dict (new manifests) decides the same
            assert decoder_for(codec_identity(made_by), vae=vae, vae_path=vae_path) == want


def test_decoder_choice_errors(vaes, tmp_path):
    # A recorded local VAE that has gone: one line naming the way out.
    gone = tmp_path / "moved-vae"
    _vae32().save_pretrained(str(gone))
    ident = Autoencoder.from_spec(str(gone)).identity
    os.rename(gone, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no longer exists.*--vae-path.*--vae") as e:
        decoder_for(ident)
    assert "\n" not in str(e.value)
    assert decoder_for(ident, vae_path=str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    # An SD-VAE copy that has gone does not matter: the EMA decoder decodes it.
    assert decoder_for({**codec_identity(vaes["mse"]), "source": str(tmp_path / "gone" / "sd-vae-ft-mse")}) == "ema"
    assert decoder_for(str(tmp_path / "gone" / "sd-vae-ft-mse")) == "ema"
    with pytest.raises(FileNotFoundError, match="--vae-path .* does not exist"):
        decoder_for("mse", vae_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="32-channel /16"):
        decoder_for("mse", vae_path=vaes["vae32"])                       # wrong latent space
    with pytest.raises(ValueError, match="choose ema or mse"):
        decoder_for("mse", vae="xl")
    with pytest.raises(ValueError, match="not an SD-VAE"):
        decoder_for(vaes["vae32"], vae="ema")
    for own in ("identity", "random-tiny"):
        with pytest.raises(ValueError, match="decodes with itself"):
            decoder_for(own, vae="ema")
        with pytest.raises(ValueError, match="decodes with itself"):
            decoder_for(own, vae_path=vaes["ema"])


def test_ema_decoder_offline_through_reg_vae_path(vaes, monkeypatch):
    monkeypatch.setenv("REG_VAE_PATH", vaes["hub"])
    dec = Autoencoder.from_spec(decoder_for(vaes["mse"]))
    assert dec.spec == "ema" and dec.identity["variant"] == "ft-ema"
    ema_weights = Autoencoder.from_spec(vaes["ema"]).vae.state_dict()
    assert all(torch.equal(v, ema_weights[k]) for k, v in dec.vae.state_dict().items())


#################################################################################
#               A 32-channel /16 VAE: encode -> dataset -> sample -> decode      #
#################################################################################

def test_vae32_through_encode_dataset_sample_decode(vaes, tmp_path):
    raw = tmp_path / "raw" / "c0"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for j in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(raw / f"{j}.png")
    data = tmp_path / "data"
    dt.main(["convert", "--source", str(tmp_path / "raw"), "--dest", str(data / "images"), "--resolution", "64",
             "--workers", "0", "--transform", "none"])
    dt.main(["encode", "--source", str(data / "images"), "--dest", str(data / "vae-latents"),
             "--model-url", vaes["vae32"], "--workers", "0"])
    manifest = json.loads((data / "vae-latents" / "manifest.json").read_text())
    codec = manifest["codec"]
    assert codec["family"] == "autoencoder-kl" and codec["source"] == vaes["vae32"]
    assert (codec["latent_channels"], codec["downsample"], codec["scale"]) == (32, 16, SCALE32)
    assert codec["bias"] == pytest.approx(-SHIFT32 * SCALE32)

    ds = REGDataset(str(data), use_features=False)
    assert ds.latent_shape == (64, 4, 4) and ds.latent_channels == 32 and ds.codec_identity == codec
    assert (ds.latent_scale, ds.latent_bias) == (SCALE32, pytest.approx(-SHIFT32 * SCALE32))
    ae = Autoencoder.from_spec(decoder_for(ds.codec_identity))
    batch = torch.stack([ds[i]["moments"] for i in range(3)])
    z = ae.sample(batch, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 32, 4, 4)
    images = ae.decode(z)
    assert images.shape == (3, 3, 64, 64)
    torch.testing.assert_close(images, ae.vae.decode(z / SCALE32 + SHIFT32).sample)
    # The stored moments are the VAE's posterior of the stored image.
    x = ds[1]["image"][None]
    torch.testing.assert_close(batch[1:2], ae.encode_moments(x), atol=1e-5, rtol=1e-5)


def test_old_manifest_without_identity_still_reads(tmp_path):
    """Manifests written before the identity was recorded: derived from the spec string."""
    data = tmp_path / "d"
    (data / "vae-latents").mkdir(parents=True)
    np.save(data / "vae-latents" / "a.npy", np.zeros((8, 2, 2), np.float32))
    (data / "vae-latents" / "dataset.json").write_text(json.dumps({"labels": [["a.npy", 0]]}))
    (data / "vae-latents" / "manifest.json").write_text(json.dumps({
        "kind": "latents", "autoencoder": "stabilityai/sd-vae-ft-mse", "scale": SD_VAE_SCALE, "bias": 0.0,
        "num_classes": 1, "resolution": 16}))
    ds = REGDataset(str(data), use_features=False, load_images=False)
    assert ds.codec_identity["family"] == "sd-vae" and decoder_for(ds.codec_identity) == "ema"


def test_moved_pca_codec_decodes_with_a_copy_given_by_vae_path(tmp_path):
    # A dataset made with the PCA codec, then moved (the recorded file is gone): issue 26, row 7.
    state = fit_patch_pca([torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)], factor=4, channels=3)
    torch.save(state, tmp_path / "pca.pt")
    ident = codec_identity(f"pca:{tmp_path / 'pca.pt'}")
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "pca.pt", tmp_path / "moved" / "pca.pt")
    with pytest.raises(FileNotFoundError, match="no longer exists; point --vae-path at a copy") as e:
        decoder_for(ident)
    assert "\n" not in str(e.value) and "fit-pca" not in str(e.value)      # one hint, not two that disagree
    copy = str(tmp_path / "moved" / "pca.pt")
    assert decoder_for(ident, vae_path=copy) == f"pca:{copy}"
    assert Autoencoder.from_spec(decoder_for(ident, vae_path=copy)).latent_channels == 3
    # a copy of another codec is refused with the numbers; --vae (an SD-VAE) is refused for PCA latents
    torch.save(fit_patch_pca([torch.zeros(1, 3, 8, 8, dtype=torch.uint8)], factor=4, channels=1), tmp_path / "o.pt")
    with pytest.raises(ValueError, match="1-channel /4 PCA codec but these latents are 3-channel /4"):
        decoder_for(ident, vae_path=str(tmp_path / "o.pt"))
    with pytest.raises(ValueError, match="not an SD-VAE; drop --vae"):
        decoder_for(ident, vae="ema")
