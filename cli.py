"""Command-line pieces shared by train.py and generate.py, so a word means one thing in both.

    --device     cpu | cuda | cuda:N   (train.py also takes the release's --cpu)
    --precision  fp32 | fp16 | bf16    autocast dtype of the network ("no" = fp32; train.py also
                                       takes the release's spelling --mixed-precision)
    --tf32       TF32 matmuls and convolutions on Ampere+ GPUs (--allow-tf32 is train.py's
                                       release spelling; --no-tf32 turns it off)
    --seed       the run's seed (--global-seed is generate.py's release spelling)

Defaults stay each release script's own: training runs fp16 without TF32, sampling fp32 with it.
"""
from __future__ import annotations

import argparse
import os
import sys

PRECISIONS = ("fp32", "fp16", "bf16")
_PRECISION_ALIASES = {"no": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def autocast_dtype(precision: str):
    """The torch dtype of a --precision's autocast (None: fp32, no autocast)."""
    import torch
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class RankZeroParser(argparse.ArgumentParser):
    """argparse whose errors are one line, printed by rank 0 only (every rank exits with status 2),
    so a bad flag under torchrun gives one message, not one per process, and not argparse's usage
    block (50 lines of flags) before the line that matters."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{self.prog}: error: {message} (all flags: {self.prog} --help)\n")
        raise SystemExit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default exactly once: appended as "(default: X)", unless the help
    text already says what the default is (one that depends on something else, like "default:
    from the dataset"); flags without help text show their default too."""

    def _format_action(self, action):
        if action.help is None and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            return text
        return f"{text} (default: %(default)s)".strip()


def precision(value: str) -> str:
    """'no'/'fp32' -> 'fp32'; 'fp16'; 'bf16'."""
    try:
        return _PRECISION_ALIASES[value]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PRECISIONS)} (or 'no'), got {value!r}") from None


class _StoreTrue(argparse.Action):
    """A flag that sets dest to True (an alias such as --allow-tf32 or --cpu)."""

    def __init__(self, option_strings, dest, const=True, **kwargs):
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const)


def add_runtime_args(group, *, precision_default: str, tf32_default: bool, seed_help: str,
                     train: bool = False) -> None:
    """--device, --precision, --tf32 and --seed (with the release's spellings as aliases)."""
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if a GPU exists, else cpu)")
    if train:
        group.add_argument("--cpu", dest="device", action=_StoreTrue, const="cpu", default=argparse.SUPPRESS,
                           help="the release's spelling of --device cpu")
    group.add_argument("--precision", "--mixed-precision", dest="precision", type=precision, default=precision_default,
                       metavar="{fp32,fp16,bf16}",
                       help="autocast dtype of the network ('no' = fp32); fp16 training uses a grad scaler")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=tf32_default,
                       help="TF32 matmuls and convolutions on Ampere+ GPUs")
    group.add_argument("--allow-tf32", dest="tf32", action=_StoreTrue, default=argparse.SUPPRESS,
                       help="the release's spelling of --tf32")
    group.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0, help=seed_help)


def set_tf32(enabled: bool) -> tuple[bool, bool]:
    """Set TF32 for matmuls and cuDNN; returns the previous (matmul, cudnn) flags."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    return before
