"""The identity of a generate.py run: the key of everything that decides the pixels (two runs with
equal keys give equal images), how each invocation ran, the release's default NAME, and the check
that a sample folder holds images of this configuration (a rerun with other settings into the
same NAME is refused).
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import socket
import sys

import torch

from fileio import atomic_write_json, is_temp_file, read_json
from models.autoencoder import VAE_ALIASES
from models.sit import SiT
from runtime import Procs, one_line


def run_key(args, model, facts: dict, spec: str, resolution: int, world_size: int, shift: float) -> dict:
    """Everything that decides the pixels of image i. Two runs with equal keys give equal images.
    The key names are those of existing sidecars (e.g. global_seed), so their folders still resume."""
    key = dict(
        checkpoint_sha256=facts["sha256"], weights=facts["weights"], model_config=model.config,
        autoencoder=spec, resolution=resolution,
        sampler=args.mode, heun=args.heun, num_steps=args.num_steps, path_type=args.path_type,
        cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
        guidance_interval=[args.guidance_low, args.guidance_high],
        global_seed=args.seed, seed_scheme=args.seed_scheme,
        labels="class-balanced: i % num_classes" if args.class_balanced else "uniform",
        precision=args.precision, tf32=args.tf32,
    )
    if shift != 1.0:  # absent when off, as in sidecars written before time shifting existed
        key["time_shift"] = shift
    if args.path_drop_guidance:  # likewise
        key["path_drop_guidance"] = True
    if args.seed_scheme == "release":  # the release's noise depends on the layout of the work
        key.update(world_size=world_size, per_proc_batch_size=args.per_proc_batch_size)
    return json.loads(json.dumps(key))  # tuples -> lists, as read back from disk


def run_info(args, facts: dict, procs: Procs) -> dict:
    """How this invocation ran (does not decide the result in the per-image scheme)."""
    return dict(
        started=datetime.datetime.now().isoformat(timespec="seconds"), host=socket.gethostname(),
        world_size=procs.world_size, per_proc_batch_size=args.per_proc_batch_size,
        decode_batch_size=args.decode_batch_size, device=procs.device.type, torch=torch.__version__,
        checkpoint=os.path.abspath(args.ckpt), checkpoint_steps=facts["steps"], model_name=facts["name"],
        vae_path_env=os.environ.get("REG_VAE_PATH"), command=sys.argv,
    )


def vae_label(args, spec: str) -> str:
    """The decoder as the release's name spells it: ema / mse, else the codec's own name."""
    if args.vae is not None:
        return args.vae
    for short, hf_id in VAE_ALIASES.items():
        if spec in (short, hf_id):
            return short
    return os.path.basename(spec.rstrip(os.sep).removeprefix("pca:")) or spec


def default_name(args, facts: dict, spec: str, resolution: int, has_cls: bool) -> str:
    """The release's folder name (REG's for class-token checkpoints, REPA's without), floats as Python's str()."""
    model = (args.model or facts["name"] or "custom").replace("/", "-")
    ckpt = os.path.basename(args.ckpt).replace(".pt", "")
    name = (f"{model}-{ckpt}-size-{resolution}-vae-{vae_label(args, spec)}-cfg-{args.cfg_scale}"
            f"-seed-{args.seed}-{args.mode}")
    if has_cls:
        name += f"-{args.guidance_high}-{args.cls_cfg_scale}"
    return name


_SIT_DEFAULTS = {k: p.default for k, p in inspect.signature(SiT.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}


def comparable_key(key: dict) -> dict:
    """A run key for comparison: model_config entries at SiT's own defaults are dropped, so that an
    option added to the model later (recorded at its default) does not orphan existing folders."""
    key = dict(key or {})
    cfg = key.get("model_config")
    if isinstance(cfg, dict):
        defaults = json.loads(json.dumps(_SIT_DEFAULTS, default=list))
        key["model_config"] = {k: v for k, v in cfg.items() if not (k in defaults and defaults[k] == v)}
    return key


def _key_diff(old: dict, new: dict) -> str:
    old, new = comparable_key(old), comparable_key(new)
    fields = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields if old.get(k) != new.get(k))


def prepare_run(folder: str, final_json: str, npz_path: str, key: dict, info: dict, num_images: int):
    """Rank 0: check the folder and the final sidecar against this run. Returns (error, complete)."""
    if os.path.isfile(final_json):
        stored = read_json(final_json)
        if comparable_key(stored.get("key")) != comparable_key(key):
            return (f"{npz_path} was made with a different configuration ({_key_diff(stored.get('key', {}), key)}); "
                    "choose another --name or --sample-dir, or delete it"), False
        if stored.get("num_images") == num_images and os.path.isfile(npz_path):
            return None, True
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        stored = read_json(config_path)
        if comparable_key(stored.get("key")) != comparable_key(key):
            return (f"sample dir {folder} holds images from a different configuration "
                    f"({_key_diff(stored.get('key', {}), key)}); choose another --name or --sample-dir, or delete it"), False
        runs = stored.get("runs", []) + [info]
        key = stored["key"]  # keep the stored spelling
    elif os.path.isdir(folder) and any(not is_temp_file(f) for f in os.listdir(folder)):
        return (f"sample dir {folder} holds files but no config.json (not made by this generate.py); "
                "choose another --name or --sample-dir, or delete it"), False
    else:
        runs = [info]
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(config_path, dict(key=key, runs=runs))
    return None, False


def writable_error(sample_dir: str, folder: str) -> str | None:
    """One line if the sample dir (or the run's folder in it) cannot be written, else None."""
    try:
        os.makedirs(sample_dir, exist_ok=True)
    except OSError as e:
        return (f"cannot create --sample-dir {sample_dir} ({e.strerror or one_line(e)}); create it yourself "
                "or choose a writable --sample-dir")
    for d in (sample_dir, folder):
        if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
            return (f"cannot write to {d} (read-only); make it writable (chmod u+w {d}) "
                    "or choose another --sample-dir")
    return None
