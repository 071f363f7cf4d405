"""dataset.REGDataset on our layout (built by the tools) and on the release's layout.

Pairing is checked through values: with the identity codec the stored moments are the image
itself (x / 127.5 - 1), so an image paired with the wrong latent shows at once; release-style
files carry their index in their pixels and moments.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dataset import REGDataset  # noqa: E402
from models.encoders import load_encoders  # noqa: E402
from preprocessing import dataset_tools as dt  # noqa: E402

RES = 32


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """raw folder -> convert -> encode (identity) -> cache-features (random-vit-tiny, full + cls)."""
    root = tmp_path_factory.mktemp("ours")
    rng = np.random.default_rng(1)
    for c, n in (("b_cls", 3), ("a_cls", 4)):
        os.makedirs(root / "raw" / c)
        for j in range(n):
            PIL.Image.fromarray(rng.integers(0, 256, (40 + 7 * j, 50, 3), dtype=np.uint8)).save(
                root / "raw" / c / f"{j}.png")
    data = root / "data"
    dt.main(["convert", "--source", str(root / "raw"), "--dest", str(data / "images"), "--resolution", str(RES),
             "--workers", "0"])
    dt.main(["encode", "--source", str(data / "images"), "--dest", str(data / "vae-latents"),
             "--model-url", "identity", "--workers", "0"])
    for kind in ("full", "cls"):
        dt.main(["cache-features", "--source", str(data / "images"), "--enc-type", "random-vit-tiny",
                 "--kind", kind, "--chunk-size", "3", "--workers", "0"])
    return data


def _png(path):
    return torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_our_layout_items_pair_by_name(ours):
    ds = REGDataset(str(ours), use_features=False)
    assert len(ds) == 7 and ds.num_classes == 2 and ds.resolution == RES
    assert ds.latent_shape == ds.moments_shape == (6, RES, RES) and ds.latent_channels == 3
    assert ds.autoencoder_spec == "identity" and (ds.latent_scale, ds.latent_bias) == (1.0, 0.0)
    assert ds.feature_kind == "none" and not ds.has_features(["random-vit-tiny"])
    labels = dict(json.loads((ours / "images" / "dataset.json").read_text())["labels"])
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "moments", "label"}
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, RES, RES)
        assert torch.equal(item["image"], _png(ours / "images" / f"{ds.key(i)}.png"))
        assert torch.equal(item["moments"][:3], item["image"].float() / 127.5 - 1)
        assert item["label"].dtype == torch.int64 and int(item["label"]) == labels[f"{ds.key(i)}.png"]
    # sorted class folders: a_cls -> 0 (first 4 images), b_cls -> 1
    assert [int(ds[i]["label"]) for i in range(len(ds))] == [0, 0, 0, 0, 1, 1, 1]


def test_cached_features_match_the_encoder(ours):
    enc = load_encoders("random-vit-tiny", RES)[0]
    full = REGDataset(str(ours), use_features="auto", enc_types=["random-vit-tiny"])
    cls_only = REGDataset(str(ours), use_features="cls", enc_types=["random-vit-tiny"])
    assert full.feature_kind == "full" and cls_only.feature_kind == "cls"
    assert full.encoder_widths == {"random-vit-tiny": 64} and full.has_features(["random-vit-tiny"], kind="full")
    assert not cls_only.has_features(["random-vit-tiny"], kind="full")
    assert not full.load_images and cls_only.load_images       # full cache: images not needed
    for i in range(len(full)):
        x = _png(ours / "images" / f"{full.key(i)}.png")[None]
        cls, tokens = enc(x)
        a, b = full[i], cls_only[i]
        assert "image" not in a and "enc_tokens" not in b and torch.equal(b["image"], x[0])
        assert a["enc_tokens"][0].dtype == torch.float16 and a["enc_tokens"][0].shape == (5, 64)
        # The cache ran batches of 7, this check batches of 1: equal up to fp16 rounding.
        torch.testing.assert_close(a["enc_tokens"][0], tokens[0].half(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a["enc_cls"][0], cls[0].half(), atol=2e-3, rtol=2e-3)
        assert torch.equal(a["enc_cls"][0], a["enc_tokens"][0][0]) and torch.equal(b["enc_cls"][0], a["enc_cls"][0])


def test_dataloader_workers_and_persistent_workers(ours):
    ds = REGDataset(str(ours), use_features="full", enc_types="random-vit-tiny", load_images=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    direct = [ds[i] for i in range(len(ds))]
    for _ in range(2):                                           # two epochs on the same workers
        batches = list(loader)
        assert sum(len(b["label"]) for b in batches) == len(ds)
        images = torch.cat([b["image"] for b in batches])
        tokens = torch.cat([b["enc_tokens"][0] for b in batches])
        assert images.dtype == torch.uint8 and images.shape == (7, 3, RES, RES)
        assert torch.equal(images, torch.stack([d["image"] for d in direct]))
        assert torch.equal(tokens, torch.stack([d["enc_tokens"][0] for d in direct]))


def _release_layout(root, image_dir="images", image_ids=(0, 1, 2), latent_ids=(0, 1, 2)):
    """The release's folders: images/00000/imgXXXXXXXX.png, vae-sd/00000/img-mean-std-XXXXXXXX.npy."""
    os.makedirs(root / image_dir / "00000")
    os.makedirs(root / "vae-sd" / "00000")
    for i in image_ids:
        PIL.Image.fromarray(np.full((RES, RES, 3), 10 * i, np.uint8)).save(root / image_dir / f"00000/img{i:08d}.png")
    labels = []
    for i in latent_ids:
        np.save(root / "vae-sd" / f"00000/img-mean-std-{i:08d}.npy", np.full((8, 4, 4), float(i), np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 3])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.mark.parametrize("image_dir", ["images", "imagenet_256_vae"])
def test_release_layout_is_read(tmp_path, image_dir):
    root = _release_layout(tmp_path, image_dir, image_ids=(0, 2, 5), latent_ids=(0, 2, 5))
    ds = REGDataset(str(root))
    assert ds.autoencoder_spec == "stabilityai/sd-vae-ft-mse" and ds.latent_scale == pytest.approx(0.18215)
    assert ds.latent_shape == (8, 4, 4) and ds.resolution == RES and ds.num_classes == 3
    for i, idx in enumerate((0, 2, 5)):
        item = ds[i]
        assert int(item["image"][0, 0, 0]) == 10 * idx and float(item["moments"][0, 0, 0]) == idx
        assert int(item["label"]) == idx % 3


def test_pairing_is_by_name_not_position(tmp_path, capsys):
    # Same number of files, different names: the release would silently pair 3 with 2.
    root = _release_layout(tmp_path, image_ids=(0, 1, 2), latent_ids=(0, 1, 3))
    with pytest.raises(ValueError, match="img-mean-std-00000003.npy"):
        REGDataset(str(root))
    # Images without latents are an error too (encode did not finish / was run on other images).
    root2 = _release_layout(tmp_path / "b", image_ids=(0, 1, 2), latent_ids=(0, 1))
    with pytest.raises(ValueError, match="img00000002.png"):
        REGDataset(str(root2))


def test_dataset_bad_input(tmp_path, ours):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        REGDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no latents folder"):
        REGDataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="use_features"):
        REGDataset(str(ours), use_features="yes")
    with pytest.raises(FileNotFoundError, match="no cached features for dinov2-vit-b"):
        REGDataset(str(ours), use_features=True, enc_types=["dinov2-vit-b"])
    root = _release_layout(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="full feature cache"):
        REGDataset(str(root), use_features="full", enc_types=["random-vit-tiny"])
    # An unlabeled latent in the release layout.
    np.save(root / "vae-sd" / "00000" / "img-mean-std-00000009.npy", np.zeros((8, 4, 4), np.float32))
    with pytest.raises(ValueError, match="img-mean-std-00000009.npy"):
        REGDataset(str(root))
    # A feature cache that misses an image.
    feat = ours / "features-random-vit-tiny-cls" / "manifest.json"
    saved = feat.read_text()
    m = json.loads(saved)
    dropped = m["keys"].pop()
    feat.write_text(json.dumps(m))
    try:
        with pytest.raises(ValueError, match=dropped):
            REGDataset(str(ours), use_features="cls", enc_types=["random-vit-tiny"])
    finally:
        feat.write_text(saved)
    # An interrupted step is refused with the way out.
    (tmp_path / "half" / "vae-latents").mkdir(parents=True)
    (tmp_path / "half" / "vae-latents" / ".partial.json").write_text("{}")
    with pytest.raises(ValueError, match="rerun the same"):
        REGDataset(str(tmp_path / "half"))
