"""Every encoder family of the REPA/REG releases, offline, with random weights.

Facts are written here from REPA's code (its ``preprocess_raw_image``, ``load_encoders`` and model
files), not read from a release checkout. Published checkpoint layouts are written by the tests
themselves from a random instance, with key names spelled out here, and loaded back through the
same code path as a real file; outputs must be identical.

Sizes: forward passes at full size (256/512 px) run on ``torch.device('meta')`` (shapes only)
with the real width, heads and patch size but 1 block; the biggest full-depth architectures are
built on meta by a slow test (parameter counts). Numerical checks (token rules, published layouts,
training steps) run each family's real layout -- patch size, norms, activation, class token,
registers, key names -- at depth 1 and a narrow width (NARROW), on 32 px images.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import encoders as E
from models.encoders import (Encoder, encoder_record, load_encoders, num_patch_tokens, parse_enc_types,
                             random_encoder)

# ---- REPA's preprocess_raw_image, written out (train.py of sihyun-yu/REPA) ----------------------
CLIP_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _normalize(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def repa_preprocess(x, family):
    resolution = x.shape[-1]
    x = x / 255.0
    if family == "clip":
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
        return _normalize(x, CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD)
    x = _normalize(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if family in ("dinov2", "jepa"):
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x                                                     # mocov3, mae, dinov1: no resize


# ---- the release encoders: (family, width, depth, heads, patch) from REPA's model files ---------
RELEASED = {
    "dinov2-vit-s": ("dinov2", 384, 12, 6, 14), "dinov2-vit-b": ("dinov2", 768, 12, 12, 14),
    "dinov2-vit-l": ("dinov2", 1024, 24, 16, 14), "dinov2-vit-g": ("dinov2", 1536, 40, 24, 14),
    "dinov2-vit-s-reg": ("dinov2", 384, 12, 6, 14), "dinov2-vit-b-reg": ("dinov2", 768, 12, 12, 14),
    "dinov2-vit-l-reg": ("dinov2", 1024, 24, 16, 14), "dinov2-vit-g-reg": ("dinov2", 1536, 40, 24, 14),
    "dinov1-vit-b": ("dinov1", 768, 12, 12, 16),
    "mocov3-vit-s": ("mocov3", 384, 12, 12, 16), "mocov3-vit-b": ("mocov3", 768, 12, 12, 16),
    "mocov3-vit-l": ("mocov3", 1024, 24, 16, 16),
    "mae-vit-l": ("mae", 1024, 24, 16, 16),
    "jepa-vit-h": ("jepa", 1280, 32, 16, 14),
    "clip-vit-L": ("clip", 1024, 24, 16, 14),
    "dinov2-vit-tiny": ("dinov2", 128, 4, 4, 14),
}
# One of each family (real width) for the numerical tests.
FAMILY_REPS = ["dinov2-vit-s-reg", "dinov1-vit-b", "mocov3-vit-s", "mae-vit-l", "jepa-vit-h", "clip-vit-L"]
# OpenAI ships CLIP as TorchScript; writing and reading one warns that TorchScript is deprecated.
pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning"), pytest.mark.usefixtures("single_thread")]
ENV_VARS = ("REG_DINOV2_WEIGHTS", "REG_DINOV2_REPO", "REG_DINOV1_WEIGHTS", "REG_MOCOV3_WEIGHTS",
            "REG_MAE_WEIGHTS", "REG_JEPA_WEIGHTS", "REG_CLIP_WEIGHTS")


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch, tmp_path):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))         # no ~/.cache/clip


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@torch.no_grad()
def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor random and O(1)-scaled (norm weights and layer scales around 1), so that
    every block, norm and embedding shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("gamma") or (p.ndim == 1 and "norm" in name and name.endswith("weight")):
            p.copy_(1 + 0.1 * noise)
        elif p.ndim >= 2 and not name.endswith(("pos_embed", "cls_token", "reg_token")):
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * noise)
    return module


# Numerical tests run the families' real layouts (patch, norms, activation, class token,
# registers, published key names) at depth 1 and a narrow width: the token rules and key
# mappings do not depend on width or depth; real sizes are checked on meta tensors above.
NARROW = {"dinov2": 96, "dinov1": 64, "mocov3": 48, "mae": 80, "jepa": 112, "clip": 128}


def _narrow_specs():
    return {name: dataclasses.replace(spec, width=NARROW[spec.family.family], heads=2, depth=1)
            for name, spec in E.ENCODERS.items() if spec.family.family in NARROW and name != "dinov2-vit-tiny"}


@pytest.fixture
def narrow(monkeypatch):
    """The registry's released encoders at depth 1, narrow (see NARROW); dinov2-vit-tiny as is."""
    for name, spec in _narrow_specs().items():
        monkeypatch.setitem(E.ENCODERS, name, spec)


def _tiny(name, resolution=32, seed=1):
    """A random instance of the (narrowed) registry entry, every weight O(1)."""
    return _randomize(random_encoder(name, resolution), seed)


#################################################################################
#                          Names, widths, token counts                          #
#################################################################################

def test_release_names_and_aliases():
    # REPA's README list, REG's README list, and REPA/REG's register spelling 'dinov2reg-vit-X'.
    repa = "dinov2-vit-b,dinov2-vit-l,dinov2-vit-g,dinov1-vit-b,mocov3-vit-b,mocov3-vit-l,clip-vit-L,jepa-vit-h,mae-vit-l"
    assert parse_enc_types(repa) == repa.split(",")
    assert parse_enc_types("dinov2reg-vit-b, clip-vit-l ,ijepa-vit-h") == ["dinov2-vit-b-reg", "clip-vit-L", "jepa-vit-h"]
    with pytest.raises(ValueError, match="twice"):
        parse_enc_types("dinov2reg-vit-s,dinov2-vit-s-reg")
    for name, (family, width, depth, heads, patch) in RELEASED.items():
        spec = E.encoder_spec(name)
        assert (spec.family.family, spec.width, spec.depth, spec.heads, spec.patch) == (family, width, depth, heads, patch)
        assert E.ENCODER_WIDTHS[name] == width == E.encoder_width(name)
        # The token count of SiT-*/2 on /8 latents: (R/16)^2, for every family.
        assert num_patch_tokens(name, 256) == 256 and num_patch_tokens(name, 512) == 1024
        assert num_patch_tokens(name, 64) == 16
    assert E.encoder_spec("dinov2-vit-b-reg").registers == 4 and E.encoder_spec("dinov2-vit-b").registers == 0


def test_token_count_check_names_both_counts():
    E.check_token_count("dinov2-vit-b,mae-vit-l", 256, 256)
    with pytest.raises(ValueError, match=r"mae-vit-l gives 256 patch tokens at 256 px but the SiT has 64 image tokens"):
        E.check_token_count(["mae-vit-l"], 256, 64)


@pytest.mark.parametrize("resolution", [256, 512])
def test_preprocessing_matches_repa(resolution):
    x = _images(1, resolution)
    checked = set()
    for name, (family, *_rest) in RELEASED.items():
        if family not in checked:      # the numbers once per family; every member shares its class's data
            checked.add(family)
            enc = Encoder(name, nn.Identity(), "timm", resolution)      # preprocessing needs no backbone
            torch.testing.assert_close(enc.preprocess(x), repa_preprocess(x.float(), family), rtol=0, atol=1e-6)
        rec = encoder_record(name, resolution)["preprocessing"]
        resized = family in ("clip", "dinov2", "jepa")
        assert rec["resize"] == (224 * resolution // 256 if resized else None)
        assert rec["mean"] == list(CLIP_DEFAULT_MEAN if family == "clip" else IMAGENET_DEFAULT_MEAN)
        assert rec["std"] == list(CLIP_DEFAULT_STD if family == "clip" else IMAGENET_DEFAULT_STD)
        assert rec["order"] == (["resize", "normalize"] if family == "clip" else
                                ["normalize", "resize"] if resized else ["normalize"])


@pytest.mark.parametrize("resolution", [256, 512])
def test_output_shapes_all_encoders_meta(resolution):
    """Real width/heads/patch, 1 block, shapes only (meta tensors): (N, Z) and (N, 1 + T, Z)."""
    t = (resolution // 16) ** 2
    for name, (_family, width, _depth, heads, patch) in RELEASED.items():
        enc = random_encoder(name, resolution, depth=1, device="meta")
        assert enc.backbone.patch_embed.proj.kernel_size == (patch, patch)
        assert enc.backbone.blocks[0].attn.num_heads == heads
        assert enc.backbone.patch_embed.grid_size == (resolution // 16,) * 2
        glob, tokens = enc(torch.zeros(1, 3, resolution, resolution, device="meta"))
        assert glob.shape == (1, width) and tokens.shape == (1, 1 + t, width), name
        assert enc.num_tokens == 1 + t and enc.embed_dim == width


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [
    ("clip-vit-L", (303.0e6, 304.5e6)),       # OpenAI ViT-L/14 image tower without its projection
    ("jepa-vit-h", (630.0e6, 633.0e6)),       # ViT-H/14, 632M
    ("dinov2-vit-g-reg", (1.10e9, 1.14e9)),   # ViT-g/14, 1.1B
])
def test_full_depth_architectures_meta(name, params):
    """The biggest real configs at full depth (meta, no forward): blocks, prefix tokens, parameters."""
    family, width, depth, _heads, _patch = RELEASED[name]
    b = random_encoder(name, 256, device="meta").backbone
    assert len(b.blocks) == depth and b.embed_dim == width
    assert b.num_prefix_tokens == (0 if family == "jepa" else 1) + E.encoder_spec(name).registers
    assert params[0] < sum(p.numel() for p in b.parameters()) < params[1]


def test_architecture_details():
    """What distinguishes the families' blocks (from the published architectures)."""
    from timm.layers import LayerScale, QuickGELU
    clip = random_encoder("clip-vit-L", 32, depth=1, device="meta").backbone
    assert isinstance(clip.blocks[0].mlp.act, QuickGELU) and not isinstance(clip.norm_pre, nn.Identity)
    assert clip.patch_embed.proj.bias is None and clip.norm.eps == 1e-5
    dino = random_encoder("dinov2-vit-tiny", 64, depth=None, device="meta").backbone
    assert isinstance(dino.blocks[0].ls1, LayerScale) and len(dino.blocks) == 4 and dino.embed_dim == 128
    for name in ("mocov3-vit-s", "mae-vit-l", "dinov1-vit-b", "jepa-vit-h"):
        b = random_encoder(name, 32, depth=1, device="meta").backbone
        assert b.norm.eps == 1e-6 and b.blocks[0].attn.qkv.bias is not None, name
        assert isinstance(b.blocks[0].ls1, nn.Identity) and isinstance(b.blocks[0].mlp.act, nn.GELU)
    assert random_encoder("jepa-vit-h", 32, depth=1, device="meta").backbone.cls_token is None


#################################################################################
#                           Which tokens each family gives                      #
#################################################################################

@pytest.mark.parametrize("name", FAMILY_REPS)
def test_global_and_patch_token_rules(narrow, name):
    enc = _tiny(name)
    family = enc.spec.family.family
    x = _images(2)
    glob, tokens = enc(x)
    pre = enc.preprocess(x)
    normed = enc.backbone.forward_features(pre)                       # timm: blocks, then the final norm
    no_norm = copy.deepcopy(enc.backbone)
    no_norm.norm = nn.Identity()
    last_block = no_norm.forward_features(pre)
    prefix = enc.backbone.num_prefix_tokens
    if family == "jepa":      # no class token: mean of the final-normed patch tokens
        torch.testing.assert_close(glob, normed.mean(1))
        torch.testing.assert_close(tokens[:, 1:], normed)
    else:                     # the class token after the final norm
        torch.testing.assert_close(glob, normed[:, 0])
    if family in ("clip", "mae"):   # REPA aligns to the last block's patch tokens, no final norm
        torch.testing.assert_close(tokens[:, 1:], last_block[:, prefix:])
        assert not torch.allclose(tokens[:, 1:], normed[:, prefix:])
    elif family != "jepa":
        torch.testing.assert_close(tokens[:, 1:], normed[:, prefix:])   # registers dropped
    torch.testing.assert_close(tokens[:, 0], glob)
    assert tokens.shape == (2, 5, enc.embed_dim) and not torch.allclose(glob[0], glob[1])
    rec = encoder_record(name, 256)
    assert rec["global_token"] == ("mean-of-patches" if family == "jepa" else "class-token")
    assert rec["patch_tokens"] == ("last-block" if family in ("clip", "mae") else "final-norm")


#################################################################################
#                    Published layouts, written here, loaded back                #
#################################################################################

def _timm_sd(enc):
    return {k: v.detach().clone() for k, v in enc.backbone.state_dict().items()}


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_torchscript(sd, path):
    """A TorchScript archive holding ``sd`` under its dotted names (OpenAI ships CLIP that way)."""
    root = _Node()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        m = root
        for p in parents:
            if not hasattr(m, p):
                m.add_module(p, _Node())
            m = getattr(m, p)
        m.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(path))


def write_published(name, enc, folder, file_name=None):
    """The family's published checkpoint layout, built from a random instance; returns its path."""
    spec = enc.spec
    family = spec.family.family
    sd = _timm_sd(enc)
    path = os.path.join(folder, file_name or spec.weights_file)
    if family == "dinov2":        # official .pth: timm's names plus mask_token (no registers here)
        assert spec.registers == 0
        torch.save({**sd, "mask_token": torch.zeros(1, spec.width)}, path)
    elif family == "dinov1":      # DINO's backbone file: plain state dict, timm's names
        torch.save(sd, path)
    elif family == "mocov3":      # moco-v3 .pth.tar: whole MoCo model under module.*
        state = {f"module.base_encoder.{k}": v for k, v in sd.items()}
        state["module.base_encoder.head.0.weight"] = torch.randn(4096, spec.width)       # projector MLP
        state["module.momentum_encoder.cls_token"] = torch.randn(1, 1, spec.width)
        state["module.predictor.0.weight"] = torch.randn(4096, 256)
        torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {}}, path)
    elif family == "mae":         # MAE pretrain checkpoint: {'model': timm names}
        torch.save({"model": sd}, path)
    elif family == "jepa":        # I-JEPA .pth.tar: context encoder under module.*, plus the rest
        enc_sd = {f"module.{k}": v for k, v in sd.items()}
        target = {f"module.{k}": v + 1 for k, v in sd.items()}                        # must NOT be used
        torch.save({"encoder": enc_sd, "target_encoder": target, "predictor": {"module.mask_token": torch.zeros(1, 1, 384)},
                    "epoch": 300, "loss": 0.1, "batch_size": 2048, "world_size": 16, "lr": 0.001}, path)
    elif family == "clip":        # OpenAI's TorchScript file: fp16, 'visual.*' names, text tower too
        rename = [("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."), ("blocks.", "transformer.resblocks."),
                  (".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.qkv.weight", ".attn.in_proj_weight"),
                  (".attn.qkv.bias", ".attn.in_proj_bias"), (".attn.proj.", ".attn.out_proj."),
                  (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]
        out = {}
        for k, v in sd.items():
            if k == "cls_token":
                out["visual.class_embedding"] = v.reshape(-1)
            elif k == "pos_embed":
                out["visual.positional_embedding"] = v[0]
            elif k.startswith("norm."):
                out["visual.ln_post." + k[5:]] = v
            else:
                for a, b in rename:
                    k = k.replace(a, b)
                out["visual." + k] = v
        out["visual.proj"] = torch.randn(spec.width, 768)
        out["positional_embedding"] = torch.randn(77, 768)                      # text tower
        out["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(3 * 768, 768)
        out["text_projection"] = torch.randn(768, 768)
        _save_torchscript({k: v.half() for k, v in out.items()}, path)
    else:
        raise AssertionError(family)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """{name: (random instance, path of its published-layout file)} for one encoder per family."""
    folder = str(tmp_path_factory.mktemp("weights"))
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, spec in _narrow_specs().items():
            mp.setitem(E.ENCODERS, name, spec)
        for seed, name in enumerate(["dinov2-vit-tiny", "dinov1-vit-b", "mocov3-vit-b", "mae-vit-l", "jepa-vit-h",
                                     "clip-vit-L"]):
            enc = _tiny(name, seed=seed + 10)
            if enc.spec.family is E.CLIP:             # the file is fp16: compare with fp16-rounded weights
                with torch.no_grad():
                    for p in enc.backbone.parameters():
                        p.copy_(p.half().float())
            out[name] = (enc, write_published(name, enc, folder))
    return out


@pytest.mark.parametrize("name", ["dinov2-vit-tiny", "dinov1-vit-b", "mocov3-vit-b", "mae-vit-l", "jepa-vit-h",
                                  "clip-vit-L"])
def test_published_layout_loads_to_identical_outputs(published, narrow, name):
    ref, path = published[name]
    loaded = load_encoders([name], 32, local_paths={name: path})[0]
    assert loaded.backend == "timm" and loaded.weights.path == path
    x = _images(2)
    g0, t0 = ref(x)
    g1, t1 = loaded(x)
    assert torch.equal(g0, g1) and torch.equal(t0, t1)
    for (k, a), (_, b) in zip(ref.backbone.state_dict().items(), loaded.backbone.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_env_variable_and_repa_folder_names(published, narrow, tmp_path, monkeypatch):
    """Per-family env variables; a folder found by the published name or REPA's ./ckpts/ name."""
    x = _images(1)
    for name, env, repa_name in [("mocov3-vit-b", "REG_MOCOV3_WEIGHTS", "mocov3_vitb.pth"),
                                 ("mae-vit-l", "REG_MAE_WEIGHTS", None),
                                 ("clip-vit-L", "REG_CLIP_WEIGHTS", None)]:
        ref, path = published[name]
        folder = tmp_path / name
        folder.mkdir()
        os.symlink(path, folder / (repa_name or os.path.basename(path)))
        monkeypatch.setenv(env, str(folder))
        assert torch.equal(load_encoders(name, 32)[0](x)[1], ref(x)[1])
        monkeypatch.setenv(env, path)                                          # the file itself
        assert torch.equal(load_encoders(name, 32)[0](x)[0], ref(x)[0])
    # Several encoders at once, each from its own variable.
    monkeypatch.setenv("REG_DINOV2_WEIGHTS", published["dinov2-vit-tiny"][1])
    encs = load_encoders("mocov3-vit-b,dinov2-vit-tiny,clip-vit-l", 32)
    assert [e.name for e in encs] == ["mocov3-vit-b", "dinov2-vit-tiny", "clip-vit-L"]
    assert [e.embed_dim for e in encs] == [NARROW["mocov3"], 128, NARROW["clip"]]


def test_checkpoint_pos_embed_resampled_like_repa(narrow, tmp_path):
    """A published 224-px checkpoint (14x14 grid for /16 models) at 256 px: REPA's
    timm resample_abs_pos_embed(pos, [16, 16]); I-JEPA (no class row) at 512 px: to 32x32."""
    from timm.layers import resample_abs_pos_embed

    mae = _tiny("mae-vit-l", 224, seed=3)                                       # 224 px -> (1, 197, Z)
    assert mae.backbone.pos_embed.shape == (1, 197, NARROW["mae"])
    path = write_published("mae-vit-l", mae, str(tmp_path))
    at256 = load_encoders("mae-vit-l", 256, local_paths={"mae-vit-l": path})[0]
    torch.testing.assert_close(at256.backbone.pos_embed.data,
                               resample_abs_pos_embed(mae.backbone.pos_embed.data, [16, 16]), rtol=0, atol=0)
    assert at256(_images(1, 256))[1].shape == (1, 257, NARROW["mae"])

    jepa = _tiny("jepa-vit-h", 256, seed=4)                                     # 224 px input -> (1, 256, Z)
    path = write_published("jepa-vit-h", jepa, str(tmp_path))
    at512 = load_encoders("jepa-vit-h", 512, local_paths={"jepa-vit-h": path})[0]
    torch.testing.assert_close(at512.backbone.pos_embed.data, resample_abs_pos_embed(
        jepa.backbone.pos_embed.data, [32, 32], num_prefix_tokens=0), rtol=0, atol=0)


def test_mocov3_published_key_fixes():
    """The published MoCo v3 ViT-L checkpoint misnames four keys (REPA renames them)."""
    raw = {"state_dict": {"module.base_encoder.blocks.13.norm13.weight": 1, "module.base_encoder.blocks.13.mlp.fc13.bias": 2,
                          "module.base_encoder.blocks.14.norm14.bias": 3, "module.base_encoder.blocks.14.mlp.fc14.weight": 4,
                          "module.base_encoder.head.0.weight": 5, "module.momentum_encoder.norm.weight": 6,
                          "module.base_encoder.norm.weight": 7}}
    assert E.MoCoV3.to_timm(raw, E.encoder_spec("mocov3-vit-l"), None) == {
        "blocks.13.norm1.weight": 1, "blocks.13.mlp.fc1.bias": 2, "blocks.14.norm2.bias": 3,
        "blocks.14.mlp.fc2.weight": 4, "norm.weight": 7}


def test_wrong_file_for_the_name_is_one_line(published, narrow):
    _, path = published["mae-vit-l"]
    with pytest.raises(ValueError, match=r"does not fit encoder 'mocov3-vit-s'.*expected vit-s-300ep.pth.tar") as e:
        load_encoders("mocov3-vit-s", 32, local_paths={"mocov3-vit-s": path})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not an OpenAI CLIP checkpoint"):
        load_encoders("clip-vit-L", 32, local_paths={"clip-vit-L": path})


@pytest.mark.parametrize("name,file,env,where", [
    ("dinov1-vit-b", "dino_vitbase16_pretrain.pth", "REG_DINOV1_WEIGHTS", "dl.fbaipublicfiles.com/dino/"),
    ("mocov3-vit-s", "vit-s-300ep.pth.tar", "REG_MOCOV3_WEIGHTS", "dl.fbaipublicfiles.com/moco-v3/"),
    ("mocov3-vit-l", "vitl.pth.tar", "REG_MOCOV3_WEIGHTS", "LTH14/rcg"),
    ("mae-vit-l", "mae_pretrain_vit_large.pth", "REG_MAE_WEIGHTS", "dl.fbaipublicfiles.com/mae/"),
    ("jepa-vit-h", "IN1K-vit.h.14-300e.pth.tar", "REG_JEPA_WEIGHTS", "dl.fbaipublicfiles.com/ijepa/"),
    ("clip-vit-L", "ViT-L-14.pt", "REG_CLIP_WEIGHTS", "openaipublic.azureedge.net/clip/"),
    ("dinov2-vit-tiny", "dinov2_vittiny14_pretrain.pth", "REG_DINOV2_WEIGHTS", "save_official_layout"),
])
def test_missing_weights_one_line_error(name, file, env, where, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_encoders(name, 256)
    msg = str(e.value)
    assert file in msg and env in msg and where in msg and "\n" not in msg
    monkeypatch.setenv(env, str(tmp_path))                          # a folder without the file
    with pytest.raises(FileNotFoundError, match=file.replace(".", r"\.")):
        load_encoders(name, 256)
    monkeypatch.setenv(env, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=f"{env}=.*does not exist"):
        load_encoders(name, 256)
    with pytest.raises(FileNotFoundError, match="not found at"):
        load_encoders([name], 256, local_paths={name: str(tmp_path / "nope.pth")})


#################################################################################
#                      dinov2-vit-tiny and the official layout                   #
#################################################################################

def test_dinov2_tiny_official_layout_round_trip(tmp_path, monkeypatch):
    enc = _randomize(random_encoder("dinov2-vit-tiny", 64), 5)           # depth 4, width 128, 56 px input
    assert enc.input_size == 56 and enc.num_patch_tokens == 16 and len(enc.backbone.blocks) == 4
    path = E.save_official_layout(enc, str(tmp_path / "dinov2_vittiny14_pretrain.pth"))
    sd = torch.load(path, weights_only=True)
    # Official DINOv2 key names (those of facebookresearch/dinov2's DinoVisionTransformer).
    assert sd["mask_token"].shape == (1, 128) and sd["pos_embed"].shape == (1, 17, 128)
    assert {"cls_token", "patch_embed.proj.weight", "blocks.3.ls2.gamma", "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight", "norm.bias"} <= set(sd)
    x = _images(2, 64)
    want = enc(x)
    by_flag = load_encoders(["dinov2-vit-tiny"], 64, local_paths={"dinov2-vit-tiny": path})[0]
    monkeypatch.setenv("REG_DINOV2_WEIGHTS", str(tmp_path))
    by_env = load_encoders("dinov2-vit-tiny", 64)[0]
    for got in (by_flag(x), by_env(x)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # At 256 px the 4x4 position embedding is resampled to 16x16 (as for every DINOv2).
    assert load_encoders("dinov2-vit-tiny", 256)[0](_images(1, 256))[1].shape == (1, 257, 128)


def test_official_layout_with_registers_round_trip(narrow, tmp_path):
    enc = _tiny("dinov2-vit-s-reg", seed=6)
    sd = E.official_dinov2_state_dict(enc)
    assert sd["register_tokens"].shape == (1, 4, 96) and sd["pos_embed"].shape == (1, 5, 96)
    assert "reg_token" not in sd
    path = E.save_official_layout(enc, str(tmp_path / "w.pth"))
    loaded = load_encoders("dinov2reg-vit-s", 32, local_paths={"dinov2-vit-s-reg": path})[0]
    x = _images(2)
    assert torch.equal(loaded(x)[1], enc(x)[1])


#################################################################################
#                   A REG and a REPA step on each family's outputs              #
#################################################################################

@pytest.mark.parametrize("name", FAMILY_REPS)
def test_reg_and_repa_step_on_encoder_targets(narrow, name, make_sit):
    """A tiny SiT on 32 px (4x4 latents, patch 2: 4 tokens = the encoder's 2x2 grid): the global
    token sets the REG token width, the tokens are the alignment targets; gradients flow."""
    from loss import SILoss

    enc = _tiny(name)
    images = _images(2)
    glob, tokens = enc(images)
    z = enc.embed_dim
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 3])
    torch.manual_seed(0)
    for variant in ("reg", "repa"):
        model = make_sit(input_size=4, z_dims=[z], cls_token_dim=z if variant == "reg" else 0).train()
        assert model.pos_embed.shape[1] == 4 + (variant == "reg")
        zs = [tokens] if variant == "reg" else [tokens[:, 1:]]
        terms = SILoss()(model, latents, dict(y=y), zs=zs, cls_token=glob if variant == "reg" else None)
        loss = terms[0].mean() + 0.5 * terms[1] + 0.03 * terms[4].mean()
        loss.backward()
        assert torch.isfinite(loss) and -1 <= float(terms[1].detach()) <= 1
        grad = model.projectors[0][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0
        if variant == "reg":
            assert float(terms[4].mean().detach()) > 0 and model.cls_projectors2.weight.shape == (model.config["hidden_size"], z)


def test_official_layout_giant_swiglu_round_trip(narrow, tmp_path):
    """ViT-g's SwiGLU MLP is 'mlp.w12' / 'mlp.w3' in the official file, 'fc1' / 'fc2' in timm."""
    enc = _tiny("dinov2-vit-g", seed=8)
    path = E.save_official_layout(enc, str(tmp_path / "dinov2_vitg14_pretrain.pth"))
    sd = torch.load(path, weights_only=True)
    assert "blocks.0.mlp.w12.weight" in sd and "blocks.0.mlp.w3.bias" in sd and "blocks.0.mlp.fc1.weight" not in sd
    loaded = load_encoders("dinov2-vit-g", 32, local_paths={"dinov2-vit-g": str(tmp_path)})[0]
    x = _images(2)
    assert torch.equal(loaded(x)[1], enc(x)[1])


def test_unreadable_or_untrusted_file_is_one_line(narrow, tmp_path):
    import argparse
    path = tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth"
    torch.save({"teacher": {}, "args": argparse.Namespace(arch="vit_base")}, path)   # DINO's full checkpoints
    with pytest.raises(ValueError, match="cannot read weights file .*re-save it without them") as e:
        load_encoders("dinov1-vit-b", 32, local_paths={"dinov1-vit-b": str(path)})
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_encoders("dinov1-vit-b", 32, local_paths={"dinov1-vit-b": str(tmp_path / "junk.pth")})


def test_weights_records_compare_by_content():
    f1 = {"source": "file", "path": "/a/dinov2_vitb14_pretrain.pth", "sha256": "ab" * 32}
    moved = {**f1, "path": "/b/copy.pth"}
    other = {**f1, "sha256": "cd" * 32}
    hub = {"source": "torch.hub", "path": "facebookresearch/dinov2", "model": "dinov2_vitb14", "sha256": None}
    rand = {"source": "random", "seed": 0, "sha256": None}
    assert E.weights_differ(f1, moved) is None                     # same bytes elsewhere
    assert "sha256 abababababab" in E.weights_differ(f1, other)
    assert E.weights_differ(f1, {**hub, "sha256": "ab" * 32}) is None   # hub checkpoint on disk, same bytes
    assert E.weights_differ(f1, hub) is None                       # not downloaded yet: cannot tell
    assert E.weights_differ(f1, rand) and E.weights_differ(rand, f1)
    assert E.weights_differ(rand, {**rand, "seed": 1}) and E.weights_differ(rand, dict(rand)) is None
    assert E.weights_differ(hub, {**hub, "model": "dinov2_vitl14"})
