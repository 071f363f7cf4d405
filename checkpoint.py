"""Checkpoints: self-describing, written atomically, readable with ``torch.load(weights_only=True)``.

Layout of ``{output_dir}/{exp_name}/checkpoints/{step:07d}.pt`` (keys of the release kept):
    model, ema      state_dicts of the SiT
    opt             optimizer state_dict
    steps           optimizer steps taken
    args            the training arguments (a plain dict)
    model_name      e.g. "SiT-XL/2";  model_config: SiT constructor kwargs (rebuilds the model)
    autoencoder     the latent codec spec the data was encoded with; enc_types: encoder names
    scaler, rng, data   resume state (grad scaler, RNG states per rank, data-loader position)
The release's checkpoints (argparse Namespace in ``args``, no ``model_config``) also load: the
architecture is then read off the state_dict's shapes. SpeedrunDiT's are mapped to this layout on
loading (models/speedrundit.py).

Next to each checkpoint, ``{step:07d}.pt.sha256`` is its integrity record (integrity.py), written
after it; loading checks it (a damaged checkpoint is named and, on resume, the next older intact one
used). Checkpoints without one (older runs, the release's) load with a one-line note.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
import re
import shutil
import threading
import time

import torch

import disk_space
import integrity
from fileio import atomic_torch_save, remove_stale_temp_files
from models.sit import SIT_CONFIGS, SiT, complete_config
from models.speedrundit import adapt_checkpoint
from runtime import one_line

logger = logging.getLogger("train")

CKPT_NAME = re.compile(r"^(\d{7,})\.pt$")   # {step:07d}.pt


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is damaged: truncated, not a zip, or not matching its integrity record."""


def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-save
    leaves the previous checkpoint (and no half-written file under a real name). Then its
    integrity record; an older record of this name goes first, so none ever describes another file."""
    integrity.remove_record(path)
    sha256, _ = atomic_torch_save(obj, path)
    integrity.write_record(path, sha256)


def load_checkpoint(path: str, map_location="cpu", verify: bool = True, log=None) -> dict:
    """Load ours or the release's (whose args are an argparse Namespace) without unpickling code.
    ``verify``: check the integrity record first (one read of the file; ``log`` gets a one-line
    note when there is none). A damaged file raises UnreadableCheckpoint naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify:
        try:
            if not integrity.verify(path) and log is not None:
                log(f"note: {path} has no integrity record (written before records existed, or by the release): "
                    "loaded unverified")
        except integrity.IntegrityError as e:
            raise UnreadableCheckpoint(f"{path} is not a readable checkpoint (damaged: {e})") from None
    size = os.path.getsize(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: tensors are paged in on use, so 8 ranks reading an XL checkpoint (Adam state
            # included) do not each hold all of it in host memory.
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (PermissionError, FileNotFoundError):
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # OSError: a file cut short can make the zip reader seek before its start (EINVAL)
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if size == 0:
            first = "an empty file"
        elif isinstance(e, OSError) and e.errno == errno.EINVAL:
            first = f"{first}; only {size} bytes: cut short?"
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or not ({"model", "ema"} & ckpt.keys()):
        raise ValueError(f"{path} is not a SiT/REG/REPA training checkpoint (no 'model' or 'ema' key)")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return adapt_checkpoint(ckpt)   # SpeedrunDiT's layout -> ours (a no-op for other checkpoints)


def checkpoint_paths(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] sorted by step, ignoring temporary files."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := CKPT_NAME.match(name))]
    return sorted(found)


def prune_checkpoints(folder: str, keep: int, keep_every: int = 0, upto: int | None = None) -> None:
    """Keep the newest ``keep`` checkpoints (keep <= 0 keeps all) and every one whose step is a
    multiple of ``keep_every`` (milestones). With ``upto`` (the step just saved) only checkpoints up to
    it count: newer ones (damaged ones a resume fell back from) stay until this run rewrites them."""
    saved = [(s, p) for s, p in checkpoint_paths(folder) if upto is None or s <= upto]
    kept = set(disk_space.kept_steps([s for s, _ in saved], keep, keep_every))
    for step, path in saved:
        if step not in kept:
            os.remove(path)
            integrity.remove_record(path)


def infer_model_config(state_dict: dict, args: dict | None = None) -> dict:
    """SiT constructor kwargs from a state_dict's shapes (for checkpoints that do not store them).

    Shapes fix everything but the number of heads (taken from the standard size table) and
    encoder_depth (from the stored args if any; it only places the projectors, unused at sampling).
    Of the model options (issue 15), the shapes show RMSNorm (norms without bias), the value
    residual (``attn.v1_lambda``) and SPRINT (``sprint.*``); rope, the routed block range and the
    drop rates leave no parameter and come from ``args`` under their config names, else defaults."""
    args = args or {}
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    except KeyError:
        raise ValueError("state_dict has no x_embedder.proj.weight: not a SiT checkpoint") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cls_token_dim = sd["cls_projectors2.weight"].shape[1] if "cls_projectors2.weight" in sd else 0
    if "pos_embed" not in sd:
        raise ValueError("state_dict has no pos_embed (a rope-only model): its latent size is not recorded in the "
                         "weights; use a checkpoint saved by this codebase (it stores model_config)")
    num_tokens = sd["pos_embed"].shape[1] - (1 if cls_token_dim else 0)
    input_size = int(round(num_tokens ** 0.5)) * patch
    n_proj = len({k.split(".")[1] for k in sd if k.startswith("projectors.")})
    z_dims = [sd[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    projector_dim = sd["projectors.0.0.weight"].shape[0] if n_proj else 2048
    heads = next((h for d, w, h, p in SIT_CONFIGS.values() if (d, w, p) == (depth, hidden, patch)), None)
    heads = args.get("num_heads", heads)
    if heads is None:
        raise ValueError(f"cannot infer the number of heads of a non-standard SiT (depth {depth}, width {hidden}); "
                         "use a checkpoint saved by this codebase (it stores model_config)")
    table_rows = sd["y_embedder.embedding_table.weight"].shape[0]
    # The release always trains with class dropout (0.1): the last row is the null class.
    num_classes = args.get("num_classes", table_rows - 1)
    # Affine RMSNorms (wg_norm, q_norm) have a weight and no bias; LayerNorms have both.
    rms = any(f"{n}.weight" in sd and f"{n}.bias" not in sd for n in ("wg_norm", "blocks.0.attn.q_norm"))
    routing = "sprint" if "sprint.mask_token" in sd else args.get("routing", "none")
    routed = {k: args[k] for k in ("route_start", "route_end", "route_drop", "path_drop")
              if routing != "none" and args.get(k) is not None}
    return dict(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        class_dropout_prob=0.1 if table_rows > num_classes else 0.0, num_classes=num_classes,
        z_dims=z_dims, projector_dim=projector_dim,
        encoder_depth=int(args.get("encoder_depth", min(8, depth))) if n_proj else 1,
        cls_token_dim=cls_token_dim, qk_norm="blocks.0.attn.q_norm.weight" in sd,
        fused_attn=True,
        norm="rmsnorm" if rms else args.get("norm", "layernorm"),
        rope=bool(args.get("rope", False)),
        value_residual=any(k.endswith(".attn.v1_lambda") for k in sd),
        routing=routing, **routed,
    )


def checkpoint_config(ckpt: dict, weights: str | None = None, **overrides) -> dict:
    """The SiT constructor arguments a checkpoint describes: ours store them; the release's are
    read off the shapes of ``weights`` (default: the raw weights, else the EMA)."""
    state_dict = ckpt[weights] if weights else (ckpt.get("model") or ckpt["ema"])
    config = dict(ckpt.get("model_config") or infer_model_config(state_dict, ckpt.get("args")))
    config.update(overrides)
    return config


def model_from_checkpoint(ckpt: dict, weights: str = "ema", **overrides) -> SiT:
    """Rebuild the SiT a checkpoint describes and load ``weights`` ("ema" or "model") strictly."""
    if weights not in ckpt:
        raise ValueError(f"checkpoint has no {weights!r} weights (keys: {', '.join(sorted(ckpt))})")
    state_dict = {k.removeprefix("module."): v for k, v in ckpt[weights].items()}
    model = SiT(**checkpoint_config(ckpt, weights, **overrides))
    model.load_state_dict(state_dict, strict=True)
    return model


#################################################################################
#                 Reading a checkpoint to sample from (generate.py)              #
#################################################################################

RELEASE_ENCODER_DEPTH = 8          # the release's --encoder-depth default (used by --legacy)


def legacy_state_dict(state_dict: dict, encoder_depth: int) -> dict:
    """The release's --legacy remap: decoder_blocks.{i}.* -> blocks.{i + encoder_depth}.*, other keys as they are."""
    out = {}
    for key, value in state_dict.items():
        prefix = "module." if key.startswith("module.") else ""
        parts = key[len(prefix):].split(".")
        if parts[0] == "decoder_blocks" and len(parts) > 1 and parts[1].isdigit():
            key = prefix + ".".join(["blocks", str(int(parts[1]) + encoder_depth), *parts[2:]])
        out[key] = value
    return out


def load_sampling_model(path: str, weights: str = "ema", legacy: bool = False, encoder_depth: int | None = None,
                        fused_attn: bool = True):
    """The model a checkpoint describes, read on the CPU (optimizer state dropped), in eval mode,
    and the facts the sampler needs about its training. ``legacy``: the release's old layout
    (decoder_blocks.*) renamed first. Raises ValueError with one line."""
    try:
        ckpt = load_checkpoint(path)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {one_line(e)[:300]}") from None
    train_args = ckpt.get("args") or {}
    state_dict = ckpt.get(weights)
    if isinstance(state_dict, dict):
        old_layout = any(k.removeprefix("module.").startswith("decoder_blocks.") for k in state_dict)
        if legacy:
            depth = encoder_depth or train_args.get("encoder_depth") or RELEASE_ENCODER_DEPTH
            ckpt[weights] = legacy_state_dict(state_dict, int(depth))
        elif old_layout:
            raise ValueError(f"{path} holds an old release layout (decoder_blocks.*); add --legacy to rename them "
                             "to blocks.{i + encoder depth}, as the release's --legacy does")
    try:
        model = model_from_checkpoint(ckpt, weights=weights, fused_attn=fused_attn)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot build the model of {path}: {one_line(e)[:500]}") from None
    cfg = model.config
    shape = (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"])
    time_shift = train_args.get("time_shift", train_args.get("time_shifting"))  # ours / SpeedrunDiT's
    facts = dict(
        weights=weights,
        steps=ckpt.get("steps"),
        # the shapes decide; a stored name only names what the table does not know
        name=next((n for n, c in SIT_CONFIGS.items() if c == shape), None)
        or ckpt.get("model_name") or train_args.get("model"),
        autoencoder=ckpt.get("autoencoder"), codec=ckpt.get("codec"),
        path_type=train_args.get("path_type"),
        encoder_depth=(ckpt.get("model_config") or {}).get("encoder_depth", train_args.get("encoder_depth")),
        time_shift=None if time_shift is None else bool(time_shift),
        shift_base=train_args.get("shift_base"),
    )
    del ckpt  # the other weights and the Adam state are not needed any more
    return model.eval().requires_grad_(False), facts


#################################################################################
#              A run's checkpoints: listed, written in the background           #
#################################################################################

def snapshot(value):
    """A CPU copy of a (nested) state: tensors cloned, so training may go on changing the originals."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class Checkpointer:
    """The checkpoints of one run folder: ``{folder}/{step:07d}.pt``.

    ``save(step, state)`` takes a mapping name -> object with ``state_dict()`` (model, ema, opt,
    scaler, rng, data) or a plain value (steps, args, model_config, ...), copies it to the CPU at
    once and writes it atomically on a background thread while training goes on: never two
    writes at once, the previous checkpoint untouched until the new one is complete, so a save
    slower than the collective timeout cannot stall the other ranks. ``wait()`` finishes the write
    and raises its error as one line. Only the process that writes (rank 0) calls save/wait.

    Disk: ``keep_last`` newest checkpoints are kept (0: all) and every ``keep_every``-th step's
    (milestones); before each write the folder's free space is checked against the previous
    checkpoint's size (else the state's bytes), and a save that cannot fit stops the run with
    one line before anything is written."""

    def __init__(self, folder: str, keep_last: int = 0, background: bool = True, log=print, keep_every: int = 0):
        self.folder, self.keep_last, self.background, self.log = folder, keep_last, background, log
        self.keep_every = keep_every
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    # ------------------------------------------------------------------ listing
    def paths(self) -> list[tuple[int, str]]:
        return checkpoint_paths(self.folder)

    def remove_stale_temp_files(self) -> list[str]:
        """Temp files of earlier, killed saves (call once when the run starts, before any save)."""
        return remove_stale_temp_files(self.folder)

    def choose(self, resume_step: int | None, log=print) -> tuple[str | None, dict | None]:
        """(path, loaded checkpoint) to resume from: ``resume_step``'s, else the newest one that
        loads; an unreadable newest checkpoint is reported in one line and the next one tried.
        (None, None) when there is none. Errors name the folder and what exists."""
        saved = self.paths()
        if resume_step is not None:
            match = [p for s, p in saved if s == resume_step]
            if not match:
                raise FileNotFoundError(f"no checkpoint for step {resume_step} in {self.folder} "
                                        f"(have: {[s for s, _ in saved] or 'none'})")
            return match[0], load_checkpoint(match[0], log=log)
        for step, path in reversed(saved):
            try:
                return path, load_checkpoint(path, log=log)
            except ValueError as e:
                log(f"warning: {one_line(e)}; falling back to an older checkpoint")
        if saved:
            raise UnreadableCheckpoint(f"no checkpoint in {self.folder} can be read ({len(saved)} tried); "
                             "delete them or use another --exp-name")
        return None, None

    # ------------------------------------------------------------------ writing
    def save(self, step: int, state: dict) -> str:
        self.wait()
        obj = {name: snapshot(value.state_dict() if hasattr(value, "state_dict") else value)
               for name, value in state.items()}
        path = os.path.join(self.folder, f"{step:07d}.pt")
        self.check_room(path, obj)
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(path, obj, step), name="checkpoint-writer")
            self._thread.start()
        else:
            self._write(path, obj, step)
            self.raise_if_failed()
        return path

    def _write(self, path: str, obj: dict, step: int) -> None:
        t0 = time.time()
        try:
            save_checkpoint(obj, path)
            prune_checkpoints(self.folder, self.keep_last, self.keep_every, upto=step)
        except BaseException as e:  # noqa: BLE001 - reported on the training thread as one line
            previous = [p for s, p in self.paths() if p != path]
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            self._error = (f"could not write checkpoint {path}: {one_line(e)} (disk full or not writable? "
                           f"{kept}; free space or fix {self.folder}, then rerun the same command to resume)")
            return
        self.log(f"saved checkpoint {path} ({time.time() - t0:.1f}s)")

    def check_room(self, path: str, obj: dict) -> None:
        """Stop (CheckpointError, one line) before writing ``path`` when the folder cannot hold it."""
        previous = [p for s, p in self.paths() if p != path]
        need = os.path.getsize(previous[-1]) if previous else disk_space.state_bytes(obj)
        problem = disk_space.room_problem(self.folder, need)
        if problem:
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint was written yet"
            raise CheckpointError(f"not enough disk for checkpoint {path}: it {problem} (nothing written; {kept}); "
                                  "free space, lower --keep-last / --keep-every, or use another --output-dir, "
                                  "then rerun the same command to resume")

    def plan(self, max_steps: int, every: int, checkpoint_bytes: int) -> str:
        """One line on the disk this run's checkpoints will take, and whether the folder has it."""
        peak = disk_space.peak_count(max_steps, every, self.keep_last, self.keep_every)
        held = self.paths()
        on_disk = sum(os.path.getsize(p) for _, p in held)
        more = max(0, peak * checkpoint_bytes - on_disk)
        free = disk_space.free_bytes(self.folder)
        rule = (f"--keep-last {self.keep_last}" + (f" --keep-every {self.keep_every}" if self.keep_every else "")
                if self.keep_last > 0 else "all kept: --keep-last 0")
        line = (f"checkpoints: ~{disk_space.human(checkpoint_bytes)} each, up to {peak} at once ({rule}): "
                f"~{disk_space.human(peak * checkpoint_bytes)}; {self.folder} has {disk_space.human(free)} free")
        if more > free:
            line = (f"warning: {line}, ~{disk_space.human(more)} more needed: "
                    "the run will stop at a save when it is full")
        return line

    def raise_if_failed(self) -> None:
        if self._error is not None and (self._thread is None or not self._thread.is_alive()):
            message, self._error = self._error, None
            raise CheckpointError(message)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (or a requested one read); the message is one line saying what to do."""


#################################################################################
#               Resuming a training run: choose, load, restore, save             #
#################################################################################
# Rerunning a command resumes its experiment: rank 0 chooses the checkpoint (the newest that
# loads and is intact, --resume-step's, or --resume-from's file) and broadcasts the choice; every
# process restores model, EMA, optimizer, grad scaler, step, its RNG states and the data position,
# and confirms it holds that step. N steps in one go equal N/2 + resume + N/2, bitwise on the CPU.

def save_run(run) -> str | None:
    """Checkpoint the run: the replicas are compared first (cheaply), RNG states gathered from
    every process, then rank 0 writes in the background while training goes on. Returns the
    checkpoint's path on rank 0 (None elsewhere)."""
    acc, state, args = run.accelerator, run.state, run.args
    rng = run.rng.state_dict()                                                  # collective
    sums = run.procs.gather(float(sum(p.detach().double().sum() for p in state.model.parameters())))
    if len(set(sums)) != 1:
        raise RuntimeError(f"model replicas diverged across processes at step {state.step}: checksums {sums}")
    if not acc.is_main_process:
        return None
    path = run.checkpointer.save(state.step, dict(
        model=state.model, ema=state.ema, opt=state.optimizer, steps=state.step, args=vars(args),
        model_name=run.model_name, model_config=state.model.config, autoencoder=run.dataset.autoencoder_spec,
        codec=run.dataset.codec_identity,
        enc_types=run.enc_types, scaler=state.scaler if state.scaler.is_enabled() else None,
        rng=rng, data=run.data_position))
    logger.info(f"step {state.step}: writing a checkpoint" + (f" ({run.world} replicas in sync)" if run.world > 1 else ""))
    return path


WEIGHT_FREE_CONFIG = ("fused_attn",)  # model settings that change no weight: free to toggle on resume


def resume(run, parser) -> None:
    """Rank 0 chooses the checkpoint (the newest readable one, --resume-step's, or --resume-from)
    and broadcasts it; every process restores it and confirms it holds that step."""
    args, acc, state = run.args, run.accelerator, run.state
    choice, error, damaged = None, None, False
    if acc.is_main_process:
        try:
            choice = choose_checkpoint(run, args)
        except (OSError, ValueError) as e:
            error, damaged = one_line(e), isinstance(e, UnreadableCheckpoint)
    choice, error, damaged = run.procs.broadcast((choice, error, damaged))
    if damaged:     # an explicitly requested checkpoint is damaged: its name, not the usage
        raise CheckpointError(error)
    if error:
        parser.error(error)
    if acc.is_main_process:
        run.checkpointer.remove_stale_temp_files()
    if choice is None:
        return
    path, step = choice
    try:
        from_flag = args.resume_from and path == os.path.abspath(args.resume_from)
        ckpt = run.resume_ckpt if from_flag else load_checkpoint(path, verify=False)  # rank 0 verified it
        restore(run, ckpt, path)
        problem = None if state.step == step else f"holds step {state.step}, not {step}"
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        problem = one_line(e)
    problems = run.procs.gather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        parser.error(f"process {bad[0][0]} cannot resume from {path}: {bad[0][1]} (every process must read the "
                     "same checkpoint: check that the run folder is on storage all nodes share)")
    if acc.is_main_process:
        logger.info(f"resumed from {path} (step {step})")


def choose_checkpoint(run, args):
    """(path, step) or None for a fresh start; refuses to mix a fresh start into an old run."""
    saved = run.checkpointer.paths()
    if args.resume_from and not saved:
        return os.path.abspath(args.resume_from), int(run.resume_ckpt.get("steps", 0))
    if args.resume_from:
        logger.info(f"{run.ckpt_dir} already holds checkpoints: resuming from them (--resume-from only starts a run)")
    if args.resume_step == 0:
        if saved and not args.archive_old_run:
            raise ValueError(f"{run.ckpt_dir} holds checkpoints up to step {saved[-1][0]}; --resume-step 0 would mix "
                             "a fresh run into them: add --archive-old-run to move them aside, or use another --exp-name")
        if saved:
            archive_old_run(run)
        return None
    path, ckpt = run.checkpointer.choose(args.resume_step, log=logger.warning)
    return None if path is None else (path, int(ckpt["steps"]))


def archive_old_run(run) -> None:
    folder = os.path.join(run.exp_dir, time.strftime("archived-%Y%m%d-%H%M%S"))
    os.makedirs(folder)
    for name in ("checkpoints", "metrics.jsonl", "samples", run.args.logging_dir, "args.json"):
        src = os.path.join(run.exp_dir, name)
        if os.path.exists(src):
            shutil.move(src, os.path.join(folder, name))
    os.makedirs(run.ckpt_dir, exist_ok=True)
    logger.info(f"moved the previous run's checkpoints, metrics and samples to {folder}")


def restore(run, ckpt: dict, path: str) -> None:
    """Load a checkpoint into the run's state. A REG release checkpoint has no RNG or data
    position: the run goes on with fresh ones (said once)."""
    args, state = run.args, run.state
    stored = ckpt.get("model_config")
    if stored is not None and not args.resume_from:
        stored, ours = complete_config(stored), state.model.config
        diff = sorted(k for k in set(stored) | set(ours)
                      if k not in WEIGHT_FREE_CONFIG and stored.get(k) != ours.get(k))
        if diff:
            raise ValueError(f"{path} was trained with a different model configuration "
                             f"({', '.join(f'{k}: {stored.get(k)} -> {ours.get(k)}' for k in diff)}); "
                             "use another --exp-name")
    weights = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    state.model.load_state_dict(weights)
    if state.ema is not None:
        state.ema.load_state_dict({k.removeprefix("module."): v for k, v in (ckpt.get("ema") or weights).items()})
    load_optimizer_state(state.optimizer, ckpt["opt"])
    apply_optimizer_flags(state.optimizer, args)
    if ckpt.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["steps"])
    run.data_position.load_state_dict(ckpt.get("data"))
    restored_rng = run.rng.load_state_dict(ckpt.get("rng"), reseed=args.seed + run.rank + state.step)
    if not restored_rng and run.accelerator.is_main_process:
        why = "has none (a release checkpoint)" if not ckpt.get("rng") else f"was written by {len(ckpt['rng'])} processes"
        logger.warning(f"{path} {why}: RNG states reseeded and the data order restarts at step {state.step}'s "
                       "position of this run's order (not restorable)")


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Load AdamW state written with any kernel choice (the release's default, foreach, fused) into
    this run's optimizer, keeping this run's kernels: flags restored, step counters moved to where
    those kernels keep them (fused: on the parameter's device; foreach: on the CPU)."""
    kernel_keys = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad")
    keep = [{k: g.get(k) for k in kernel_keys} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, flags in zip(inner.param_groups, keep):
        group.update(flags)
        for p in group["params"]:
            st = inner.state.get(p)
            if st and "step" in st:
                st["step"] = st["step"].to(p.device if flags["fused"] else "cpu", torch.float32)


def apply_optimizer_flags(optimizer, args) -> None:
    """The flags given now win over the values stored in the checkpoint (and the change is logged),
    so args.json, new checkpoints and the optimizer always agree."""
    want = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.adam_weight_decay)
    for group in optimizer.param_groups:
        changed = {k: (group[k], v) for k, v in want.items() if tuple(_seq(group[k])) != tuple(_seq(v))}
        if changed:
            logger.info("optimizer settings changed on resume: "
                        + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        group.update(want)


def _seq(v):
    return v if isinstance(v, (list, tuple)) else [v]


class RNGStates:
    """Every process's RNG states (CPU, and the current CUDA device), saved as a list by rank.
    ``state_dict`` is a collective: every process calls it at a save."""

    def __init__(self, gather, rank: int, world: int, device):
        self.gather, self.rank, self.world, self.device = gather, rank, world, device

    def _mine(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> list:
        return self.gather(self._mine())

    def load_state_dict(self, states, reseed: int) -> bool:
        """Restore this process's state; False (and a fresh seed) when the process count changed."""
        if not states or len(states) != self.world:
            torch.manual_seed(reseed)
            return False
        torch.set_rng_state(states[self.rank]["torch"])
        if self.device.type == "cuda" and "cuda" in states[self.rank]:
            torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        return True


def read_checkpoint(path: str, parser) -> dict:
    """load_checkpoint, its failure one line: a damaged file as CheckpointError, others through ``parser.error``."""
    try:
        return load_checkpoint(path, log=logger.info)
    except UnreadableCheckpoint as e:
        raise CheckpointError(one_line(e)) from None
    except (OSError, ValueError) as e:
        parser.error(one_line(e))


def log_disk_plan(run) -> None:
    """Rank 0, at the start: one line on the disk the run's checkpoints take (a warning if it lacks it)."""
    if run.accelerator.is_main_process:
        args = run.args
        line = run.checkpointer.plan(args.max_train_steps, args.checkpointing_steps,
                                     disk_space.training_checkpoint_bytes(run.state.model))
        (logger.warning if line.startswith("warning") else logger.info)(line.removeprefix("warning: "))


def check_data_fits(config, z_dims, channels, size, path, parser):
    problems = []
    if (config["in_channels"], config["input_size"]) != (channels, size):
        problems.append(f"it denoises {config['in_channels']} x {config['input_size']}^2 latents, the data has "
                        f"{channels} x {size}^2")
    if config["cls_token_dim"] and z_dims and config["cls_token_dim"] != z_dims[0]:
        problems.append(f"its class token has width {config['cls_token_dim']}, the encoder gives {z_dims[0]}")
    if problems:
        parser.error(f"{path} does not fit this dataset: " + "; ".join(problems))


def init_weights_from(model, ckpt: dict, path: str) -> None:
    """Copy every tensor of the checkpoint's EMA (else raw) weights whose name and shape match;
    what the checkpoint lacks keeps its fresh initialisation (e.g. REG's class-token layers when
    starting from REPA). The fixed position table is never copied (REPA's has no class row)."""
    source = {k.removeprefix("module."): v for k, v in (ckpt.get("ema") or ckpt["model"]).items()}
    own = model.state_dict()
    loaded = {k: v for k, v in source.items() if k in own and k != "pos_embed" and own[k].shape == v.shape}
    model.load_state_dict(loaded, strict=False)
    fresh = sorted(k for k in own if k not in loaded and k != "pos_embed")
    skipped = sorted(k for k in source if k not in loaded and k != "pos_embed")
    logger.info(f"initialised {len(loaded)} tensors from {path}; fresh: {', '.join(fresh) or 'none'}"
                + (f"; not used: {', '.join(skipped)}" if skipped else ""))
