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
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import threading
import time

import torch

from fileio import atomic_torch_save, remove_stale_temp_files
from runtime import one_line
from models.sit import SIT_CONFIGS, SiT
from models.speedrundit import adapt_checkpoint

CKPT_NAME = re.compile(r"^(\d{7,})\.pt$")   # {step:07d}.pt


def save_checkpoint(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-save
    leaves the previous checkpoint (and no half-written file under a real name)."""
    atomic_torch_save(obj, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load ours or the release's (whose args are an argparse Namespace) without unpickling code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: tensors are paged in on use, so 8 ranks reading an XL checkpoint (Adam state
            # included) do not each hold all of it in host memory.
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({first})") from None
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


def prune_checkpoints(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (keep <= 0 keeps all)."""
    if keep > 0:
        for _, path in checkpoint_paths(folder)[:-keep]:
            os.remove(path)


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


def model_from_checkpoint(ckpt: dict, weights: str = "ema", **overrides) -> SiT:
    """Rebuild the SiT a checkpoint describes and load ``weights`` ("ema" or "model") strictly."""
    if weights not in ckpt:
        raise ValueError(f"checkpoint has no {weights!r} weights (keys: {', '.join(sorted(ckpt))})")
    state_dict = {k.removeprefix("module."): v for k, v in ckpt[weights].items()}
    config = dict(ckpt.get("model_config") or infer_model_config(state_dict, ckpt.get("args")))
    config.update(overrides)
    model = SiT(**config)
    model.load_state_dict(state_dict, strict=True)
    return model


#################################################################################
#                      A run's checkpoints: save, choose, restore               #
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
    and raises its error as one line. Only the process that writes (rank 0) calls save/wait."""

    def __init__(self, folder: str, keep_last: int = 0, background: bool = True, log=print):
        self.folder, self.keep_last, self.background, self.log = folder, keep_last, background, log
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
            return match[0], load_checkpoint(match[0])
        for step, path in reversed(saved):
            try:
                return path, load_checkpoint(path)
            except ValueError as e:
                log(f"warning: {one_line(e)}; falling back to an older checkpoint")
        if saved:
            raise ValueError(f"no checkpoint in {self.folder} can be read ({len(saved)} tried); "
                             "delete them or use another --exp-name")
        return None, None

    # ------------------------------------------------------------------ writing
    def save(self, step: int, state: dict) -> str:
        self.wait()
        obj = {name: snapshot(value.state_dict() if hasattr(value, "state_dict") else value)
               for name, value in state.items()}
        path = os.path.join(self.folder, f"{step:07d}.pt")
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(path, obj), name="checkpoint-writer")
            self._thread.start()
        else:
            self._write(path, obj)
            self.raise_if_failed()
        return path

    def _write(self, path: str, obj: dict) -> None:
        t0 = time.time()
        try:
            save_checkpoint(obj, path)
            prune_checkpoints(self.folder, self.keep_last)
        except BaseException as e:  # noqa: BLE001 - reported on the training thread as one line
            previous = [p for s, p in self.paths() if p != path]
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            self._error = (f"could not write checkpoint {path}: {one_line(e)} (disk full or not writable? "
                           f"{kept}; free space or fix {self.folder}, then rerun the same command to resume)")
            return
        self.log(f"saved checkpoint {path} ({time.time() - t0:.1f}s)")

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
    """A checkpoint could not be written; the message is one line saying what to do."""
