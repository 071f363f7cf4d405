"""Every encoder family through train.py and generate.py: a REG and a REPA run on its outputs, and a
checkpoint that records the encoder and rebuilds the same model for sampling. The encoders are the
families' real layouts at depth 1 and a narrow width (test_encoder_families.narrow), loaded through
their env variable from a file in the family's published layout."""
import os

import numpy as np
import pytest
import torch

import checkpoint
import generate
import models.encoders as E
import train
from conftest import train_args
from test_encoder_families import _tiny, narrow, write_published  # noqa: F401 - narrow is a fixture

FAMILIES = ["mocov3-vit-b", "clip-vit-L", "dinov1-vit-b", "mae-vit-l", "jepa-vit-h", "dinov2-vit-s"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.mark.parametrize("name", [FAMILIES[0]] + [pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES[1:]])
def test_an_encoder_family_trains_reg_and_repa_and_its_checkpoint_samples(name, narrow, digits_data, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    spec = E.encoder_spec(name)
    weights = write_published(name, _tiny(name, 32), str(tmp_path))
    monkeypatch.setenv(spec.family.env_var, weights)
    width = spec.width
    for label, extra, cls_dim in (("reg", {}, width), ("repa", {"no_class_token": None}, 0)):
        train.main(train_args(digits_data, tmp_path, label, 1, enc_type=name, cached_features="no",
                              checkpointing_steps=1, **extra))
        path = str(tmp_path / label / "checkpoints" / "0000001.pt")
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["enc_types"] == [name]
        assert ckpt["model_config"]["z_dims"] == [width] and ckpt["model_config"]["cls_token_dim"] == cls_dim
        rebuilt = checkpoint.model_from_checkpoint(ckpt)
        assert all(torch.equal(v, ckpt["ema"][k]) for k, v in rebuilt.state_dict().items())
        out = generate.main(["--ckpt", path, "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-steps", "2",
                             "--sample-dir", str(tmp_path / "samples"), "--name", label, "--device", "cpu"])
        with np.load(out) as f:
            assert f["arr_0"].shape == (2, 32, 32, 3)
    assert os.path.isfile(weights)
