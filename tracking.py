"""What a training run writes about itself: the log (stderr and log.txt), metrics.jsonl and the
trackers (TensorBoard, wandb), and args.json.

``MetricsLog`` sums each step's terms on the device and reduces them across processes every
--log-every steps (the only host sync of the loop). After a resume the metrics and the trackers
continue from the resumed step: lines past it are dropped, TensorBoard purges its events past it,
wandb rewinds its run to it.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import socket
import time
import urllib.parse
import uuid

import torch

from fileio import atomic_open, atomic_write_bytes

logger = logging.getLogger("train")


class MetricsLog:
    """Sums the step's outputs on the device and, every --log-every steps, reduces them across
    processes (the only host sync), writes one strict-JSON line to metrics.jsonl and the trackers.
    The grad norm is averaged over finite steps only; ``skipped_steps`` counts the others."""

    def __init__(self, path: str, accelerator, batch_size: int, step: int):
        self.path, self.acc, self.batch_size = path, accelerator, batch_size
        self.names, self.sums, self.count, self.t0 = None, None, 0, time.time()
        if accelerator.is_main_process:
            truncate_metrics(path, step)

    def add(self, out: dict) -> None:
        if self.names is None:
            self.names = [k for k in out if k not in ("grad_norm", "finite")]
        finite = out["finite"].float()
        norm = torch.where(out["finite"], out["grad_norm"], torch.zeros_like(out["grad_norm"]))
        row = torch.stack([out[k] for k in self.names] + [norm, finite, 1 - finite])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (an evaluation) out of the step rate."""
        self.t0 += seconds

    def flush(self, step: int, extra: dict | None = None) -> dict:
        sums = self.acc.reduce(self.sums, reduction="mean").tolist()           # host sync
        steps, elapsed = self.count, time.time() - self.t0
        logs = {k: v / steps for k, v in zip(self.names, sums)}
        finite_steps = sums[-2]
        logs["grad_norm"] = sums[-3] / finite_steps if finite_steps > 0 else None
        logs["skipped_steps"] = int(round(sums[-1]))
        logs["steps_per_sec"] = steps / elapsed
        logs["images_per_sec"] = steps * self.batch_size / elapsed
        logs.update(extra or {})
        logs = {k: (v if v is None or math.isfinite(v) else None) for k, v in logs.items()}
        self.acc.log({k: v for k, v in logs.items() if v is not None}, step=step)
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}, allow_nan=False) + "\n")
        self.sums, self.count, self.t0 = None, 0, time.time()
        return logs


def truncate_metrics(path: str, step: int) -> None:
    """Drop metrics.jsonl lines past ``step`` (left by a run that went on after its last checkpoint),
    so a resumed curve never loops back."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(keep).encode())


def setup_logging(path: str) -> None:
    """The run's log to stderr and log.txt (replacing those of an earlier main() in this process)."""
    for handler in [h for h in logger.handlers if getattr(h, "_train_log", False)]:
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(), logging.FileHandler(path)):
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        handler._train_log = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def feature_source(run) -> str:
    if not run.use_features:
        return "online"
    return "cached class tokens, patch tokens online" if run.online_encoders else "cached features"


def tracker_resume(run) -> dict:
    """Trackers continue the run from the resumed step: TensorBoard purges events past it, wandb keeps
    one run id per experiment folder and rewinds it to the step (steps after it are dropped)."""
    args, step = run.args, run.state.step
    if args.report_to == "tensorboard":
        return {"tensorboard": {"purge_step": step}}
    if args.report_to != "wandb":
        return {}
    path = os.path.join(run.exp_dir, "wandb-run-id.txt")
    existed = os.path.isfile(path)
    if existed:
        run_id = open(path).read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        atomic_write_bytes(path, run_id.encode())
    where = {"dir": run.exp_dir}                  # its files in the run folder, not ./wandb in the working directory
    if step > 0 and existed and os.environ.get("WANDB_MODE") != "offline":
        return {"wandb": {"name": args.exp_name, "resume_from": f"{run_id}?_step={step}", **where}}
    return {"wandb": {"id": run_id, "name": args.exp_name, "resume": "allow", **where}}


WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")


def tracker_problem(report_to: str, probe_timeout: float = 5.0) -> str | None:
    """One line if the tracker cannot work, checked before anything is built: wandb online needs a
    login and a reachable server (otherwise it waits minutes, then fails with a traceback)."""
    if report_to != "wandb" or os.environ.get("WANDB_MODE", "").lower() in WANDB_LOCAL_MODES:
        return None
    fix = "set WANDB_MODE=offline (logs locally; `wandb sync` later) or use --report-to tensorboard"
    try:
        import wandb  # noqa: F401
    except ImportError:
        return f"--report-to wandb needs the wandb package (pip install wandb); or {fix}"
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = url.hostname or "api.wandb.ai"
    if not (os.environ.get("WANDB_API_KEY") or _netrc_login(host)):
        return f"--report-to wandb: not logged in to wandb (no WANDB_API_KEY, no `wandb login`); log in, or {fix}"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=probe_timeout).close()
    except OSError as e:
        return f"--report-to wandb: cannot reach the wandb server {host} ({e.strerror or type(e).__name__}); {fix}"
    return None


def _netrc_login(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_logging(run) -> None:
    args, acc, model = run.args, run.accelerator, run.state.model
    if not acc.is_main_process:
        return
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{run.model_name}: {n_params / 1e6:.2f}M parameters; class token: {model.cls_token_dim or 'off'}; "
                f"projectors: {model.z_dims or 'off'}; encoders: {run.enc_types or 'none'} "
                f"({feature_source(run)}); {run.world} process(es), "
                f"{run.local_batch} per micro-batch")
    for note in run.dataset.notes:
        logger.info(note)
    config = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}
    acc.init_trackers("REG", config=config, init_kwargs=tracker_resume(run))
    with atomic_open(os.path.join(run.exp_dir, "args.json")) as f:
        f.write(json.dumps(vars(args), indent=2).encode())


class Progress:
    """The run's progress on the main process. At a terminal: a tqdm bar (loss and images/s shown
    at log steps). In a batch job's log (stderr not a terminal) a redrawn bar is noise: one log line
    at a log step every ``every_s`` seconds instead (step, loss, images/s, time left)."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 60.0, stream=None):
        import sys
        from tqdm.auto import tqdm

        stream = stream or sys.stderr
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream) if self.tty else None
        self.start_step, self.t0, self.last_line = initial, time.time(), time.time()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, step: int, logs: dict) -> None:
        loss = f"{logs['loss_final']:.4f}" if logs.get("loss_final") is not None else "nan"
        img_s = logs.get("images_per_sec") or 0.0
        if self.bar is not None:
            self.bar.set_postfix(loss=loss, img_s=f"{img_s:.1f}")
            return
        now = time.time()
        if not self.enabled or now - self.last_line < self.every_s:
            return
        self.last_line = now
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        eta = f"{left / 3600:.1f} h" if math.isfinite(left) else "?"
        logger.info(f"step {step}/{self.total} ({100 * step / self.total:.1f}%): loss {loss}, {img_s:.1f} img/s, "
                    f"{eta} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
