"""cache-features and REGDataset for any encoder: what the manifest records, storage dtypes,
refusing caches made with other preprocessing or other weights, class-token-only caches.

Encoders: dinov2-vit-tiny from a file in the official DINOv2 layout (the real architecture),
random-vit-tiny, and MoCo v3 ViT-B's layout (patch 16, no resize) narrowed to 48 wide, 1 block.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import REGDataset
from models import encoders as E
from models.encoders import load_encoders, random_encoder, weights_record
from preprocessing import dataset_tools as dt

RES = 32
pytestmark = pytest.mark.usefixtures("single_thread")   # tiny tensors: one thread is faster


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for v in ("REG_DINOV2_WEIGHTS", "REG_DINOV2_REPO", "REG_MOCOV3_WEIGHTS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setitem(E.ENCODERS, "mocov3-vit-b",
                        dataclasses.replace(E.ENCODERS["mocov3-vit-b"], width=48, heads=2, depth=1))


@torch.no_grad()
def _randomize(enc, seed):
    g = torch.Generator().manual_seed(seed)
    for p in enc.backbone.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    return enc


def _mocov3_file(path, seed):
    """MoCo v3's published layout ('state_dict' of 'module.base_encoder.*') from a random instance."""
    enc = _randomize(random_encoder("mocov3-vit-b", RES), seed)
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in enc.backbone.state_dict().items()}}, path)
    return str(path)


@pytest.fixture
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    raw = root / "raw"
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        os.makedirs(raw / c)
        for j in range(3):
            PIL.Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(raw / c / f"{j}.png")
    d = root / "data"
    dt.main(["convert", "--source", str(raw), "--dest", str(d / "images"), "--resolution", str(RES), "--workers", "0"])
    dt.main(["encode", "--source", str(d / "images"), "--dest", str(d / "vae-latents"), "--model-url", "identity-f8",
             "--workers", "0"])
    w = root / "weights"
    w.mkdir()
    tiny = _randomize(random_encoder("dinov2-vit-tiny", RES), 1)
    E.save_official_layout(tiny, str(w / "dinov2_vittiny14_pretrain.pth"))
    E.save_official_layout(_randomize(random_encoder("dinov2-vit-tiny", RES), 2), str(w / "other_tiny.pth"))
    return {"dir": d, "tiny": str(w / "dinov2_vittiny14_pretrain.pth"), "other_tiny": str(w / "other_tiny.pth")}


def _cache(data, enc, kind, dest, *extra):
    dt.main(["cache-features", "--source", str(data["dir"] / "images"), "--enc-type", enc, "--kind", kind,
             "--dest", str(data["dir"] / dest), "--workers", "0", "--chunk-size", "4", *extra])
    return json.loads((data["dir"] / dest / "manifest.json").read_text())


def _png(path):
    return torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_manifest_records_encoder_preprocessing_dtype_weights(data, tmp_path, monkeypatch):
    mocov3 = _mocov3_file(tmp_path / "vit-b-300ep.pth.tar", 3)
    monkeypatch.setenv("REG_MOCOV3_WEIGHTS", str(tmp_path))
    m = _cache(data, "mocov3-vit-b", "full", "f-moco", "--dtype", "float32")
    assert m["encoder"] == "mocov3-vit-b" and m["family"] == "mocov3" and m["dtype"] == "float32"
    pre = m["encoder_record"]["preprocessing"]
    assert pre["resize"] is None and pre["mean"] == [0.485, 0.456, 0.406] and pre["order"] == ["normalize"]
    assert m["weights"]["path"] == mocov3 and m["weights"]["sha256"] == weights_record("mocov3-vit-b")["sha256"]
    assert m["item_shape"] == [5, 48] and np.load(data["dir"] / "f-moco" / "chunk-000000.npy").dtype == np.float32
    t = _cache(data, "dinov2-vit-tiny", "full", "f-tiny16", "--enc-weights", data["tiny"])
    assert t["dtype"] == "float16" and t["encoder_record"]["preprocessing"]["resize"] == 28
    assert t["encoder_record"]["global_token"] == "class-token" and t["weights"]["source"] == "file"

    # The dataset serves both, in the stored dtypes; values are the online encoders'.
    ds = REGDataset(str(data["dir"]), enc_types="mocov3-vit-b,dinov2-vit-tiny", use_features="full", load_images=True)
    online = load_encoders("mocov3-vit-b,dinov2-vit-tiny", RES, local_paths={"dinov2-vit-tiny": data["tiny"]})
    assert ds.encoder_widths == {"mocov3-vit-b": 48, "dinov2-vit-tiny": 128}
    assert ds.feature_records["mocov3-vit-b"]["dtype"] == "float32"
    worst = 0.0
    for i in range(len(ds)):
        item = ds[i]
        assert item["enc_tokens"][0].dtype == torch.float32 and item["enc_tokens"][1].dtype == torch.float16
        for k, enc in enumerate(online):
            glob, tokens = enc(item["image"][None])
            got = item["enc_tokens"][k].float()
            if k == 0:
                torch.testing.assert_close(got, tokens[0], rtol=1e-5, atol=1e-5)      # float32: as computed
            worst = max(worst, float((got - tokens[0]).norm() / tokens[0].norm()))
            assert torch.equal(item["enc_cls"][k], item["enc_tokens"][k][0])
    assert 0 < worst < 1e-3                                                              # float16 rounding


def test_rerun_with_other_weights_or_dtype_is_refused(data, capsys):
    _cache(data, "dinov2-vit-tiny", "cls", "f-tiny-cls", "--enc-weights", data["tiny"])
    capsys.readouterr()
    for extra, what in ((["--enc-weights", data["other_tiny"]], "weights"),
                        (["--enc-weights", data["tiny"], "--dtype", "float32"], "dtype")):
        with pytest.raises(SystemExit):
            _cache(data, "dinov2-vit-tiny", "cls", "f-tiny-cls", *extra)
        err = capsys.readouterr().err.strip().splitlines()           # refused before any progress bar
        assert len(err) == 1 and "made with other settings" in err[0] and what in err[0], err


def test_dataset_refuses_other_weights_and_other_preprocessing(data, tmp_path):
    _cache(data, "dinov2-vit-tiny", "full", "f-tiny", "--enc-weights", data["tiny"])
    root = data["dir"]
    # The weights this run will use: the cache's are accepted, others refused.
    REGDataset(str(root), enc_types=["dinov2-vit-tiny"], use_features="full",
               encoder_weights={"dinov2-vit-tiny": weights_record("dinov2-vit-tiny", data["tiny"])})
    with pytest.raises(ValueError, match="other dinov2-vit-tiny weights than this run's") as e:
        REGDataset(str(root), enc_types=["dinov2-vit-tiny"], use_features="full",
                   encoder_weights={"dinov2-vit-tiny": weights_record("dinov2-vit-tiny", data["other_tiny"])})
    assert "\n" not in str(e.value)
    # A cache whose recorded preprocessing is not the registry's (hand-edited here) is refused.
    path = root / "f-tiny" / "manifest.json"
    saved = path.read_text()
    m = json.loads(saved)
    m["encoder_record"]["preprocessing"]["mean"] = [0.5, 0.5, 0.5]
    path.write_text(json.dumps(m))
    try:
        with pytest.raises(ValueError, match=r"other preprocessing or token rules \(differs in: preprocessing\)"):
            REGDataset(str(root), enc_types=["dinov2-vit-tiny"], use_features="full")
        # A cache from before the record existed: accepted for the DINOv2 family only.
        del m["encoder_record"]
        path.write_text(json.dumps(m))
        assert REGDataset(str(root), enc_types=["dinov2-vit-tiny"], use_features="full").feature_kind == "full"
        m["encoder"] = "mocov3-vit-b"
        (root / "f-old-moco").mkdir()
        (root / "f-old-moco" / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match="no record of its preprocessing"):
            REGDataset(str(root), enc_types=["mocov3-vit-b"], use_features="full")
    finally:
        path.write_text(saved)


def test_class_token_cache_with_images_for_online_patch_tokens(data, capsys):
    """A cls-only cache while alignment needs patch tokens: the cached global tokens and the
    images (the trainer runs the encoder online for the patches)."""
    _cache(data, "random-vit-tiny", "cls", "f-rand-cls")
    ds = REGDataset(str(data["dir"]), enc_types=["random-vit-tiny"], use_features="cls", load_images=True)
    assert ds.feature_kind == "cls" and not ds.has_features(["random-vit-tiny"], kind="full")
    enc = load_encoders("random-vit-tiny", RES)[0]
    item = ds[2]
    assert set(item) == {"image", "moments", "label", "enc_cls"}
    torch.testing.assert_close(item["enc_cls"][0], enc(item["image"][None])[0][0].half(), atol=2e-3, rtol=2e-3)
    # Asking for encoders some of which have no cache names only those.
    with pytest.raises(FileNotFoundError) as e:
        REGDataset(str(data["dir"]), enc_types="random-vit-tiny,dinov2reg-vit-b,clip-vit-L", use_features=True)
    assert "no cached features for dinov2-vit-b-reg, clip-vit-L in" in str(e.value)
