"""SpeedrunDiT's (SR-DiT, arXiv 2512.12386) checkpoints in this codebase's layout.

SpeedrunDiT trains a REG SiT with SPRINT routing, RMSNorm, 2-D RoPE, QK-norm, a value residual,
CFM and a time shift on the 32-channel, 16x-downsampling E2E-INVAE latents. Its ``train.py`` saves
``{model, ema, opt, args, steps}``; the weights differ from ours in four names only:

    theirs                        ours
    mask_token                    sprint.mask_token
    fusion_proj.{weight,bias}     sprint.proj.{weight,bias}
    feat_rope.freqs_{cos,sin}     (none: AxialRoPE's tables are non-persistent; checked, then dropped)
    everything else               the same name

Its settings are fixed in its model code, not in ``args``: the SPRINT split is 2 dense blocks, the
routed blocks [2, depth - 2), drop 0.75, path drop 0.05, and the projectors read block 2 (the dense
head), so ``encoder_depth`` is 2 whatever ``args`` says; every norm is an RMSNorm, RoPE and the sin-cos
table are both on, and blocks 1.. carry a value residual. The head width comes from the RoPE table
(its width is the head dim), the latent grid from its length. ``args.time_shifting`` /
``args.shift_base`` (the sampler's time shift) and ``args.cfm_weighting`` are read by generate.py and
the trainer under those names. The latents are E2E-INVAE's (``args.vae_name``, scaled by 0.3099): decode
with a diffusers copy of that autoencoder (``--vae-path``).

``adapt_checkpoint(ckpt)`` (called by checkpoint.load_checkpoint) renames both weight sets, stores the
settings as ``model_config`` and reorders the Adam state to our parameter order, so the checkpoint
loads strictly, samples and resumes. ``to_speedrundit_state_dict`` is the inverse (tests, export).

One difference is left: SpeedrunDiT's QK-norm is ``nn.RMSNorm(head_dim)`` with torch's default eps
(float32 machine epsilon, 1.2e-7), ours uses 1e-5 (timm's); see README for its measured effect.
"""
from __future__ import annotations

import torch

from models.sit import SIT_CONFIGS, AxialRoPE, SiT

RENAMES = {"mask_token": "sprint.mask_token", "fusion_proj.weight": "sprint.proj.weight",
           "fusion_proj.bias": "sprint.proj.bias"}
ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
SPRINT_DENSE_HEAD = 2    # SpeedrunDiT's num_f = num_h = 2
ROUTE_DROP, PATH_DROP = 0.75, 0.05


def is_speedrundit_state_dict(state_dict: dict) -> bool:
    keys = {k.removeprefix("module.") for k in state_dict}
    return "fusion_proj.weight" in keys and "mask_token" in keys


def speedrundit_config(state_dict: dict, args: dict | None = None) -> dict:
    """Our SiT constructor kwargs for a SpeedrunDiT state_dict (its own layout)."""
    args = args or {}
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = [k for k in ("x_embedder.proj.weight", "pos_embed", ROPE_BUFFERS[0]) if k not in sd]
    if missing:
        raise ValueError(f"not a SpeedrunDiT SiT state_dict: no {', '.join(missing)}")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cells, head_dim = sd[ROPE_BUFFERS[0]].shape                        # (grid^2, head_dim)
    grid = int(round(cells ** 0.5))
    if grid * grid != cells or hidden % head_dim or sd["pos_embed"].shape[1] != cells + 1:
        raise ValueError(f"SpeedrunDiT state_dict with inconsistent shapes: RoPE table {tuple(sd[ROPE_BUFFERS[0]].shape)}, "
                         f"pos_embed {tuple(sd['pos_embed'].shape)}, width {hidden}")
    n_proj = len({k.split(".")[1] for k in sd if k.startswith("projectors.")})
    z_dims = [sd[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(args.get("num_classes", rows - 1))
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=hidden // head_dim, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        class_dropout_prob=0.1 if rows > num_classes else 0.0, num_classes=num_classes,
        z_dims=z_dims, projector_dim=sd["projectors.0.0.weight"].shape[0] if n_proj else 2048,
        encoder_depth=SPRINT_DENSE_HEAD, cls_token_dim=sd["cls_projectors2.weight"].shape[1],
        qk_norm="blocks.0.attn.q_norm.weight" in sd, fused_attn=True,
        norm="rmsnorm", rope=True, pos_embed="sincos", value_residual=True,
        routing="sprint", route_start=SPRINT_DENSE_HEAD, route_end=depth - SPRINT_DENSE_HEAD,
        route_drop=ROUTE_DROP, path_drop=PATH_DROP,
    )


def from_speedrundit_state_dict(state_dict: dict, config: dict) -> dict:
    """Rename to our keys; the RoPE tables are compared with ours (same grid, head dim, frequencies)
    and dropped."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    rope = AxialRoPE(config["hidden_size"] // config["num_heads"], config["input_size"] // config["patch_size"],
                     cls_token=False)
    for key, ours in zip(ROPE_BUFFERS, (rope.cos, rope.sin)):
        theirs = sd.pop(key).float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
            raise ValueError(f"{key} of this SpeedrunDiT checkpoint is not the EVA-02 2-D table this codebase builds "
                             f"(shape {tuple(theirs.shape)} vs {tuple(ours.shape)}); cannot map it")
    return {RENAMES.get(k, k): v for k, v in sd.items()}


def to_speedrundit_state_dict(model: SiT) -> dict:
    """Our SPRINT model's weights in SpeedrunDiT's layout and key order (RoPE tables included)."""
    cfg = model.config
    expected = speedrundit_config_of(model)
    if any(cfg[k] != v for k, v in expected.items()) or not cfg["cls_token_dim"]:
        raise ValueError("only a REG model with SpeedrunDiT's settings maps to its layout: "
                         + ", ".join(f"{k}={v!r}" for k, v in expected.items()))
    back = {v: k for k, v in RENAMES.items()}
    ours = model.state_dict()
    # SpeedrunDiT's order: the SiT's own parameters (mask_token, pos_embed), then its modules in
    # registration order, fusion_proj first; inside the blocks both orders agree.
    out = {"mask_token": ours["sprint.mask_token"], "pos_embed": ours["pos_embed"],
           "fusion_proj.weight": ours["sprint.proj.weight"], "fusion_proj.bias": ours["sprint.proj.bias"]}
    out.update({k: v for k, v in ours.items() if k not in back and k != "pos_embed"})
    rope = AxialRoPE(cfg["hidden_size"] // cfg["num_heads"], cfg["input_size"] // cfg["patch_size"], cls_token=False)
    out.update({ROPE_BUFFERS[0]: rope.cos.clone(), ROPE_BUFFERS[1]: rope.sin.clone()})
    return out


def speedrundit_config_of(model: SiT) -> dict:
    """The options SpeedrunDiT's model code fixes, for ``model``'s depth."""
    depth = model.config["depth"]
    return dict(norm="rmsnorm", rope=True, pos_embed="sincos", value_residual=True, routing="sprint",
                route_start=SPRINT_DENSE_HEAD, route_end=depth - SPRINT_DENSE_HEAD, encoder_depth=SPRINT_DENSE_HEAD,
                route_drop=ROUTE_DROP, path_drop=PATH_DROP)


def _our_parameter_order(config: dict) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in SiT(**config).named_parameters()]


def adapt_optimizer_state(opt_state: dict, their_names: list[str], our_names: list[str]) -> dict:
    """Adam state saved over SpeedrunDiT's ``model.parameters()`` order, re-indexed to ours (one group)."""
    groups = opt_state.get("param_groups", [])
    if len(groups) != 1 or len(groups[0]["params"]) != len(their_names) or len(their_names) != len(our_names):
        raise ValueError(f"SpeedrunDiT optimizer state with {sum(len(g['params']) for g in groups)} parameters in "
                         f"{len(groups)} groups; expected one group of {len(their_names)}")
    ours = {name: i for i, name in enumerate(our_names)}
    new_index = {old: ours[RENAMES.get(name, name)] for old, name in zip(groups[0]["params"], their_names)}
    state = {new_index[k]: v for k, v in opt_state.get("state", {}).items()}
    return {"state": dict(sorted(state.items())),
            "param_groups": [{**groups[0], "params": list(range(len(our_names)))}]}


def adapt_checkpoint(ckpt: dict) -> dict:
    """A loaded checkpoint dict in SpeedrunDiT's layout -> ours (unchanged if it is not one)."""
    weights = ckpt.get("ema") if isinstance(ckpt.get("ema"), dict) else ckpt.get("model")
    if not isinstance(weights, dict) or not is_speedrundit_state_dict(weights) or "model_config" in ckpt:
        return ckpt
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    config = speedrundit_config(weights, args)
    their_names = [k.removeprefix("module.") for k in weights if k.removeprefix("module.") not in ROPE_BUFFERS]
    out = dict(ckpt)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), dict):
            out[key] = from_speedrundit_state_dict(ckpt[key], config)
    out["model_config"] = config
    out["model_name"] = next((n for n, c in SIT_CONFIGS.items()
                              if c == (config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"])),
                             args.get("model"))
    out["layout"] = "speedrundit"
    if isinstance(ckpt.get("opt"), dict) and ckpt["opt"].get("param_groups"):
        out["opt"] = adapt_optimizer_state(ckpt["opt"], their_names, _our_parameter_order(config))
    return out
