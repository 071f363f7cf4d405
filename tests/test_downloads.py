"""Concurrent downloads: torch.hub (and the Hugging Face cache) delete and move folders while they
fill an empty cache, so ranks that load at once break each other's files. Every loading site runs on
each node's first process first, then on the others. Simulated with a fake hub whose 'download' races
exactly that way, under 2 CPU processes: cache-features and training with the online encoder succeed."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, train_args

DRIVER = r'''
import os, shutil, sys, time
sys.path.insert(0, sys.argv[1])
import torch, timm

def fake_dinov2():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1, num_classes=0, img_size=28)

    class Hub(torch.nn.Module):        # the hub model's interface: forward_features -> dict, pos_embed, head
        def __init__(self):
            super().__init__()
            self.vit, self.head = vit, torch.nn.Identity()
        @property
        def pos_embed(self):
            return self.vit.pos_embed
        def forward_features(self, x):
            out = self.vit.forward_features(x)
            return {"x_norm_clstoken": out[:, 0], "x_norm_patchtokens": out[:, 1:]}
    return Hub()

def racy_load(repo, model, source="github", trust_repo=True, **kw):
    root = os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main")
    if not os.path.isdir(root):                       # "download": clear a leftover, fill, move in place
        tmp = root + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        time.sleep(1.0)
        with open(os.path.join(tmp, "hubconf.py"), "w") as f:
            f.write("dependencies = []\n")
        time.sleep(0.5)
        shutil.move(tmp, root)
    if not os.path.isfile(os.path.join(root, "hubconf.py")):
        raise RuntimeError("the hub cache was broken by a concurrent download")
    return fake_dinov2()

torch.hub.load = racy_load
mode, argv = sys.argv[2], sys.argv[3:]
if mode == "cache-features":
    from preprocessing import dataset_tools
    dataset_tools.main(argv)
else:
    import train
    train.main(argv)
'''


def _run(tmp_path, mode, argv):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("REG_DINOV2_WEIGHTS", "REG_DINOV2_REPO")}
    env.update(TORCH_HOME=str(tmp_path / f"torch-home-{mode}"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), ROOT, mode, *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_filling_an_empty_hub_cache_both_succeed(digits_data, tmp_path):
    out = _run(tmp_path, "cache-features", ["cache-features", "--source", digits_data / "images", "--enc-type",
                                            "dinov2-vit-s", "--kind", "cls", "--dest", tmp_path / "features",
                                            "--workers", "0", "--device", "cpu"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "features" / "manifest.json").is_file()
    out = _run(tmp_path, "train", train_args(digits_data, tmp_path, "online", 1, enc_type="dinov2-vit-s",
                                             cached_features="no", checkpointing_steps=1))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stderr
