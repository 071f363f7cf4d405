"""The paper's runs as presets: each is only a set of flags for train.py and for generate.py.

    python presets.py list                      # names, what each is, the published FID
    python presets.py train reg-xl2-4m          # train.py flags, one per line
    python presets.py eval  reg-xl2-4m          # generate.py flags, one per line
    python presets.py disk                      # the disk each preset's checkpoints need
    bash train.sh reg-xl2-4m                    # train.sh / eval.sh take a preset name and print
    bash eval.sh  reg-xl2-4m                    #   the full command they run

A flag given after a preset's flags wins (argparse keeps the last value), so a preset is a
starting point, not a lock: `bash train.sh reg-b2-400k` then `EXTRA_ARGS="--batch-size 128"`.
"""
from __future__ import annotations

import sys

# The paper's recipe (REG on SiT with DINOv2-B, spec section 4): shared by every run. Disk (issue 25):
# the newest 3 checkpoints (train.sh saves every 10k steps) and a milestone every 100k (every 500k at 4M),
# not the release's keep-everything (400 x 11 GB over a 4M-step SiT-XL/2 run).
_REG = {"--enc-type": "dinov2-vit-b", "--proj-coeff": 0.5, "--cls": 0.03, "--batch-size": 256,
        "--learning-rate": 1e-4, "--path-type": "linear", "--prediction": "v", "--weighting": "uniform",
        "--precision": "fp16", "--tf32": None, "--keep-last": 3, "--keep-every": 100_000}
TRAIN_SH_CHECKPOINTING_STEPS = 10_000      # train.sh's CHECKPOINTING_STEPS default
# The release's evaluation of its final model (FID 1.36): SDE, 250 steps, guidance on image and class token.
_EVAL_GUIDED = {"--mode": "sde", "--num-steps": 250, "--cfg-scale": 2.3, "--cls-cfg-scale": 2.3,
                "--guidance-low": 0.0, "--guidance-high": 0.85, "--num-fid-samples": 50000,
                "--per-proc-batch-size": 64}
# The convergence tables (REPA's convention for 400K-step comparisons): the same sampler, no guidance.
_EVAL_PLAIN = {**_EVAL_GUIDED, "--cfg-scale": 1.0}

PRESETS = {
    "reg-b2-400k": dict(
        about="SiT-B/2 + REG, 400K steps (the paper's convergence table)",
        train={**_REG, "--model": "SiT-B/2", "--encoder-depth": 4, "--max-train-steps": 400_000},
        eval=_EVAL_PLAIN, paper_fid=None),
    "reg-l2-400k": dict(
        about="SiT-L/2 + REG, 400K steps (beats SiT-XL/2 + REPA at 4M, the paper says)",
        train={**_REG, "--model": "SiT-L/2", "--encoder-depth": 8, "--max-train-steps": 400_000},
        eval=_EVAL_PLAIN, paper_fid=None),
    "reg-xl2-400k": dict(
        about="SiT-XL/2 + REG, 400K steps (the paper's convergence table)",
        train={**_REG, "--model": "SiT-XL/2", "--encoder-depth": 8, "--max-train-steps": 400_000},
        eval=_EVAL_PLAIN, paper_fid=None),
    # SpeedrunDiT's top rung (SwayStar123/SpeedrunDiT, built on REG): every option of its ablation
    # ladder on SiT-B/1, which expects a 16x-downsampling VAE's latents (16 x 16 at 256 px; encode with
    # such an AutoencoderKL, e.g. REPA-E's). Its FID is that project's, without guidance, not measured here.
    "speedrun-b1": dict(
        about="SpeedrunDiT's ladder on SiT-B/1 (SPRINT, RMSNorm, RoPE, QK-norm, value residual, CFM, time shift; "
              "16x latents), 400K steps, no guidance, class-balanced labels",
        train={**_REG, "--model": "SiT-B/1", "--encoder-depth": 2, "--max-train-steps": 400_000,
               "--precision": "bf16", "--routing": "sprint", "--norm": "rmsnorm", "--rope": None,
               "--qk-norm": None, "--value-residual": None, "--cfm-coeff": 0.05, "--time-shift": None},
        eval={**_EVAL_PLAIN, "--class-balanced": None}, paper_fid=3.49, fid_source="SpeedrunDiT, not measured here"),
    "reg-xl2-4m": dict(
        about="SiT-XL/2 + REG, 4M steps (800 epochs): the released model",
        train={**_REG, "--model": "SiT-XL/2", "--encoder-depth": 8, "--max-train-steps": 4_000_000,
               "--keep-every": 500_000},
        eval=_EVAL_GUIDED, paper_fid=1.36),
}


def flags(name: str, kind: str) -> list[str]:
    """The preset's flags as an argv list ('train' for train.py, 'eval' for generate.py)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    argv = []
    for flag, value in PRESETS[name][kind].items():
        argv += [flag] if value is None else [flag, str(value)]
    return argv


def disk(name: str, checkpointing_steps: int = TRAIN_SH_CHECKPOINTING_STEPS) -> tuple[int, int]:
    """(bytes of one training checkpoint, most checkpoints held at once) of a preset's run."""
    import disk_space

    train = PRESETS[name]["train"]
    # the architecture flags that change the parameter count; latents: SD-VAE's 4 x 32^2, or 16^2 for /1
    config = dict(encoder_depth=train["--encoder-depth"], input_size=16 if train["--model"].endswith("/1") else 32,
                  norm=train.get("--norm", "layernorm"), qk_norm="--qk-norm" in train,
                  value_residual="--value-residual" in train, routing=train.get("--routing", "none"))
    one = disk_space.model_checkpoint_bytes(train["--model"], **config)
    peak = disk_space.peak_count(train["--max-train-steps"], checkpointing_steps, train["--keep-last"],
                                 train["--keep-every"])
    return one, peak


def disk_table() -> str:
    """A markdown table of each preset's checkpoint disk use (README.md's training section holds it)."""
    from disk_space import human

    rows = ["| preset | one checkpoint | kept (`--keep-last`, `--keep-every`) | disk at most |",
            "| --- | --- | --- | --- |"]
    for name, p in PRESETS.items():
        one, peak = disk(name)
        rows.append(f"| {name} | {human(one)} | {p['train']['--keep-last']} + every "
                    f"{p['train']['--keep-every'] // 1000}k | {human(peak * one)} ({peak} checkpoints) |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        for name, p in PRESETS.items():
            where = p.get("fid_source", "paper, with guidance")
            fid = f"FID {p['paper_fid']} ({where})" if p["paper_fid"] else "FID: see the paper's tables"
            print(f"{name:14s} {p['about']}; {fid}")
        return 0
    if argv[:1] == ["disk"]:
        print(disk_table())
        return 0
    if len(argv) != 2 or argv[0] not in ("train", "eval"):
        print("usage: python presets.py list | disk | train NAME | eval NAME", file=sys.stderr)
        return 2
    try:
        print("\n".join(flags(argv[1], argv[0])))
    except KeyError as e:
        print(f"presets.py: error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
