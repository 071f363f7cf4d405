"""What the benchmark scripts share: their runtime flags, the device, and how they read time and memory."""
from __future__ import annotations

import torch

from cli import PRECISIONS, autocast_dtype  # noqa: F401  (the scripts' --precision words and their dtypes)


def build_parser(description: str, *, model: str = "SiT-T/2", batch_help: str = "images per step"):
    """A benchmark's parser with the size flags every script has: --model --batch-size --resolution."""
    import argparse

    from models.sit import SIT_CONFIGS

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=model, choices=list(SIT_CONFIGS))
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--resolution", type=int, default=128, help="image size; latents are resolution/8 (256 for the paper)")
    p.add_argument("--projector-dim", type=int, default=2048, help="REPA projector width (release: 2048)")
    return p


def add_runtime_args(p, *, runs: int, warmup_help: str) -> None:
    """--precision --runs --warmup --threads --device, the same words in every script."""
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="network autocast dtype (fp32: none)")
    p.add_argument("--runs", type=int, default=runs, help="timed runs")
    p.add_argument("--warmup", type=int, default=1, help=warmup_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def setup(args, p) -> torch.device:
    """The device (checked), with --threads applied."""
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident set, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def reset_peak(device):
    """Start a peak-memory window: CUDA allocator peak, or the process's peak RSS (Linux). Returns
    the baseline (None where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kb("VmRSS") * 1024
    except OSError:
        return None


def peak_bytes(device, base):
    """CUDA: the allocator's peak; CPU: the growth of the peak RSS over the window since reset_peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if base is None:
        return None
    return status_kb("VmHWM") * 1024 - base
