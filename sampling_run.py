"""A sampling run, built (generate.py): the model and what its checkpoint says about its training,
the flags that describe the architecture checked against it, the decoder, and the sampler settings.
Every failure is one clear line through ``parser.error``, before any image is sampled.
"""
from __future__ import annotations

import argparse
import os

from checkpoint import load_sampling_model
from cli import RankZeroParser
from loss import SHIFT_BASE, resolution_shift
from models.autoencoder import Autoencoder, decoder_for
from runtime import one_line
from sampling import SampleSettings, model_shape


def build(parser: RankZeroParser, args, procs) -> argparse.Namespace:
    """model (eval mode, on the device), facts, spec and codec (the decoder), resolution, shift, settings."""
    model, facts = load_model(parser, args)
    resolve_sampler_args(parser, args, model)
    check_flags(parser, args, model, facts)
    spec = codec_spec(parser, args, facts)
    try:
        with procs.main_first():       # a download (Hugging Face) once per node, then the others read it
            codec = Autoencoder.from_spec(spec, device=procs.device)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"cannot load the decoder {spec!r}: {one_line(e)} "
                     "(--vae-path points at a local copy of a diffusers AutoencoderKL; REG_VAE_PATH at a "
                     "local copy of the SD-VAE)")
    resolution = check_codec(parser, args, model, codec)
    args.path_type = args.path_type or facts["path_type"] or "linear"
    shift = time_shift_factor(args, facts, model_shape(model)[0])
    settings = settings_from_args(args, model, shift)
    model.to(procs.device)
    if args.compile:
        model.compile_blocks()
    return argparse.Namespace(model=model, facts=facts, spec=spec, codec=codec, resolution=resolution, shift=shift,
                              settings=settings)


def load_model(parser: RankZeroParser, args):
    """(model in eval mode on the CPU, facts about the checkpoint); a failure is one line."""
    try:
        return load_sampling_model(args.ckpt, "model" if args.use_model_weights else "ema", legacy=args.legacy,
                                   encoder_depth=args.encoder_depth, fused_attn=args.fused_attn)
    except ValueError as e:
        parser.error(str(e))


def codec_spec(parser: RankZeroParser, args, facts: dict) -> str:
    """Which decoder: models.autoencoder.decoder_for on the checkpoint's recorded codec (SD-VAE latents,
    from the hub or a local copy, decode with the EMA decoder as released; --vae / --vae-path choose;
    other codecs decode with themselves). Release checkpoints record none: SD-VAE latents, or whatever
    --vae-path gives (then only its channels are checked against the model, in check_codec)."""
    recorded = facts["codec"] or facts["autoencoder"]
    if recorded is None and args.vae_path is not None:
        return os.path.abspath(args.vae_path)
    try:
        return decoder_for(facts["codec"] or facts["autoencoder"], args.vae, args.vae_path)
    except (ValueError, FileNotFoundError) as e:
        parser.error(one_line(e))


def resolve_sampler_args(parser: RankZeroParser, args, model) -> None:
    """Defaults that depend on the checkpoint: --mode and --cls-cfg-scale."""
    has_cls = bool(model.config["cls_token_dim"])
    if args.mode is None:
        args.mode = "sde" if has_cls else "ode"   # REG's 'ode' default exits (defect); REPA's samples
    if args.heun and args.mode != "ode":
        parser.error("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")
    if not has_cls:
        if args.cls_cfg_scale:
            parser.error("--cls-cfg-scale needs a REG checkpoint (this one has no class token)")
        args.cls_cfg_scale = 0.0
    elif args.cls_cfg_scale is None:
        args.cls_cfg_scale = 1.5                   # the release's default


def check_flags(parser: RankZeroParser, args, model, facts: dict) -> None:
    """Flags that describe the architecture must agree with the checkpoint (before loading a decoder)."""
    cfg = model.config
    problems = []
    if args.model is not None and args.model != facts["name"]:
        held = facts["name"] or f"a custom SiT (depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']})"
        problems.append(f"--model {args.model} but the checkpoint holds {held}")
    if args.num_classes is not None and args.num_classes != cfg["num_classes"]:
        problems.append(f"--num-classes {args.num_classes} but the checkpoint has {cfg['num_classes']} classes")
    if args.cls_token_dim is not None and args.cls_token_dim != cfg["cls_token_dim"]:
        problems.append(f"--cls-token-dim (--cls) {args.cls_token_dim} but the checkpoint's class token has width "
                        f"{cfg['cls_token_dim']} (0 = no class token: a REPA/SiT checkpoint)")
    if args.projector_embed_dims is not None and list(args.projector_embed_dims) != list(cfg["z_dims"]):
        dims = ",".join(map(str, cfg["z_dims"])) or "none"
        problems.append(f"--projector-embed-dims {','.join(map(str, args.projector_embed_dims))} "
                        f"but the checkpoint's projectors have widths {dims}")
    if (args.encoder_depth is not None and facts["encoder_depth"] is not None and cfg["z_dims"]
            and args.encoder_depth != facts["encoder_depth"]):
        problems.append(f"--encoder-depth {args.encoder_depth} but the checkpoint was trained with {facts['encoder_depth']}")
    if args.qk_norm is not None and args.qk_norm != cfg["qk_norm"]:
        problems.append(f"--{'' if args.qk_norm else 'no-'}qk-norm but the checkpoint was trained "
                        f"{'with' if cfg['qk_norm'] else 'without'} QK-norm")
    if args.path_type is not None and facts["path_type"] and args.path_type != facts["path_type"]:
        problems.append(f"--path-type {args.path_type} but the checkpoint was trained on the {facts['path_type']} path")
    if args.path_drop_guidance and cfg.get("routing") != "sprint":
        problems.append(f"--path-drop-guidance needs a checkpoint trained with --routing sprint "
                        f"(this one has routing {cfg.get('routing', 'none')!r})")
    if args.cfg_scale > 1.0 and cfg["class_dropout_prob"] <= 0:
        problems.append("--cfg-scale > 1 needs a model trained with class dropout (it has no null class)")
    if problems:
        parser.error("checkpoint/flag mismatch: " + "; ".join(problems))


def check_codec(parser: RankZeroParser, args, model, codec) -> int:
    """The decoder must fit the model's latents. Returns the image resolution."""
    cfg = model.config
    problems = []
    if codec.latent_channels != cfg["in_channels"]:
        problems.append(f"the decoder {codec.spec!r} has {codec.latent_channels} latent channels but the model "
                        f"denoises {cfg['in_channels']} (choose the codec it was trained with: --vae/--vae-path)")
    resolution = cfg["input_size"] * codec.downsample
    if args.resolution is not None and args.resolution != resolution:
        problems.append(f"--resolution {args.resolution} but the checkpoint makes {resolution}px images "
                        f"({cfg['input_size']} latents x {codec.downsample})")
    if problems:
        parser.error("checkpoint/decoder mismatch: " + "; ".join(problems))
    return resolution


def time_shift_factor(args, facts: dict, latent_shape) -> float:
    """1 (none) unless time shifting is on (--time-shift, else the checkpoint's training args);
    then loss.resolution_shift(latent_shape, --shift-base or the checkpoint's or SHIFT_BASE)."""
    on = args.time_shift if args.time_shift is not None else bool(facts["time_shift"])
    if not on:
        return 1.0
    base = args.shift_base or facts["shift_base"] or SHIFT_BASE
    return float(resolution_shift(latent_shape, int(base)))


def settings_from_args(args, model, shift: float) -> SampleSettings:
    return SampleSettings(
        mode=args.mode, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
        cls_cfg_scale=args.cls_cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
        path_type=args.path_type, time_shift=shift, path_drop_guidance=args.path_drop_guidance,
        precision=args.precision, class_balanced=args.class_balanced,
        num_classes=model.config["num_classes"], seed=args.seed, decode_batch_size=args.decode_batch_size,
    )
