"""The paper's central comparison at CPU scale: SiT vs REPA vs REG at equal steps, on the digits.

    python demo/ablation.py [--out ablation_out] [--seeds 0,1,2,3,4] [--steps 400] [--jobs 2] ...

(Wall times measured on the shared 2-core machine: README, "SiT vs REPA vs REG".)

1. the data, as the built-in run makes it (make_digits, convert, fit-pca, encode);
2. per seed s, a semantic encoder: ``dinov2-vit-tiny`` trained self-supervised on the digits with seed s
   (demo/train_encoder.py --seed s), written in the official DINOv2 layout, and its features cached
   by ``cache-features --enc-type dinov2-vit-tiny --enc-weights FILE_s --dest data/features-...-s{s}``
   (train.py picks, among the caches, the one made with ``REG_DINOV2_WEIGHTS=FILE_s``, which this
   script sets for seed s's runs). The encoder is part of the random draw: seed s = (encoder s,
   training s), so the spread over seeds includes the encoder's variance;
3. per seed, three train.py runs that differ only in the ablation flags -- SiT (``--no-class-token
   --no-projectors``), REPA (``--no-class-token``), REG (defaults) -- each scored during training
   (``--fid-every``, ``--fid-metric digits``: FD on a digit classifier's features and the digit
   accuracy, evaluations/digits.py) at the same steps on the same K per-image seeds;
4. table.md / table.json (FD and accuracy at each evaluated step, per run, mean and spread over
   seeds; in how many seeds each of the paper's orderings holds; each encoder's probe) and
   ablation.png (FD and accuracy against steps: one curve per method, seeds as thin lines).

Every stage runs the project's own CLI with the arguments printed; up to ``--jobs`` of them at once as
separate processes, one thread each (on a shared 2-core machine, several threads per process are
several times slower than one), or all in this process with ``--jobs 0`` (tests). Rerunning resumes:
finished stages and runs are skipped, an interrupted training run resumes from its last checkpoint.
Everything is seeded and one-threaded: a rerun on the same platform gives the same numbers bit for bit
(tests/test_ablation_pins.py pins what they depend on). See the README's ablation section.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from checkpoint import checkpoint_paths  # noqa: E402
from demo.plot_loss import read_metrics  # noqa: E402

METHODS = {                      # name -> the ablation flags (everything else identical)
    "SiT": ["--no-class-token", "--no-projectors"],
    "REPA": ["--no-class-token"],
    "REG": [],
}
ENCODER = "dinov2-vit-tiny"
ORDERINGS = ("REG<REPA<SiT", "REG<REPA", "REPA<SiT", "REG<SiT")     # the paper's, counted per seed
SCRIPTS = {"demo/make_digits.py": "demo.make_digits", "preprocessing/dataset_tools.py": "preprocessing.dataset_tools",
           "demo/train_encoder.py": "demo.train_encoder", "train.py": "train"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SiT vs REPA vs REG at equal steps on the built-in digits.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="ablation_out", help="everything the experiment writes goes here")
    p.add_argument("--seeds", default="0,1,2,3,4",
                   help="comma-separated seeds (each: an encoder and three runs; 5: at 3 the spread left the step-200 order open)")
    p.add_argument("--methods", default="SiT,REPA,REG", help="subset of SiT,REPA,REG")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once as processes (0: all in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    g = p.add_argument_group("training (the same for every run)")
    g.add_argument("--model", default="SiT-T/2")
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--learning-rate", default="1e-3")
    g.add_argument("--ema-decay", default="0.99")
    g.add_argument("--encoder-depth", type=int, default=2, help="SiT block the REPA projector reads")
    g.add_argument("--projector-dim", type=int, default=256)
    g = p.add_argument_group("evaluation during training (the same for every run)")
    g.add_argument("--eval-every", type=int, default=100, help="FD / accuracy every N steps (and a checkpoint)")
    g.add_argument("--fid-num-samples", type=int, default=250, help="K images per evaluation (class-balanced)")
    g.add_argument("--fid-num-steps", type=int, default=25, help="SDE steps")
    g.add_argument("--fid-cfg-scale", default="1", help="guidance (1: none, as the paper's convergence tables)")
    g.add_argument("--fid-seed", type=int, default=0, help="seed of the K images' noises: the same for all runs")
    g = p.add_argument_group("encoder and data")
    g.add_argument("--encoder-steps", type=int, default=300)
    g.add_argument("--encoder-batch-size", type=int, default=128)
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--max-images", type=int, default=None, help="only the first N digits (tests)")
    return p


def parse_list(s: str, kind=str) -> list:
    return [kind(x.strip()) for x in str(s).split(",") if x.strip()]


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One unit of work: CLI calls run in order; skipped when ``done()``."""
    name: str
    calls: list                               # [(script, argv)]
    deps: tuple = ()
    done: object = None                       # callable -> bool
    env: dict = field(default_factory=dict)


def manifest_done(folder: str):
    return lambda: os.path.isfile(os.path.join(folder, "manifest.json"))


def encoder_done(argv: list) -> bool:
    """The encoder file exists and was trained with these settings (train_encoder.py's own check)."""
    from demo import train_encoder
    return train_encoder.trained_report(train_encoder.build_parser().parse_args(argv)) is not None


def run_name(method: str, seed: int) -> str:
    return f"{method.lower()}-s{seed}"


def encoder_name(seed: int) -> str:
    return f"encoder-s{seed}"


def plan(args) -> tuple[list[Stage], dict]:
    """The stages: the data; per seed an encoder (trained with that seed) and its cached features
    (``data/features-dinov2-vit-tiny-full-s{seed}``: train.py picks the cache whose weights are this
    run's); per seed and method a training run. Encoder seed = training seed, so each seed is one draw
    of (encoder, training) and the spread over seeds includes the encoder's variance."""
    out, res = args.out, args.resolution
    data, raw = os.path.join(out, "data"), os.path.join(out, "raw")
    images, latents, pca = os.path.join(data, "images"), os.path.join(data, "vae-latents"), os.path.join(data, "pca-f8c4.pt")
    exps = os.path.join(out, "exps")
    tools = "preprocessing/dataset_tools.py"
    threads = str(args.threads)
    convert = ["convert", "--source", raw, "--dest", images, "--resolution", f"{res}x{res}", "--transform",
               "center-crop", "--workers", "0"]
    if args.max_images:
        convert += ["--max-images", str(args.max_images)]
    stages = [
        Stage("data", [("demo/make_digits.py", ["--out", raw, "--size", str(res)]),
                       (tools, convert),
                       (tools, ["fit-pca", "--source", images, "--dest", pca, "--factor", "8", "--channels", "4"]),
                       (tools, ["encode", "--source", images, "--dest", latents, "--model-url", f"pca:{pca}",
                                "--workers", "0"])],
              done=manifest_done(latents)),
    ]
    seeds, weights = parse_list(args.seeds, int), {}
    for seed in seeds:              # every encoder first: they need nothing, the SiT runs only the data
        weights[seed] = os.path.abspath(os.path.join(out, "encoder", f"dinov2_vittiny14_digits-s{seed}.pth"))
        encoder_argv = ["--out", weights[seed], "--resolution", str(res), "--steps", str(args.encoder_steps),
                        "--batch-size", str(args.encoder_batch_size), "--seed", str(seed), "--threads", threads]
        if args.max_images:
            encoder_argv += ["--max-images", str(args.max_images)]
        stages.append(Stage(encoder_name(seed), [("demo/train_encoder.py", encoder_argv)],
                            done=lambda argv=encoder_argv: encoder_done(argv)))
    for seed in seeds:
        features = os.path.join(data, f"features-{ENCODER}-full-s{seed}")
        stages.append(Stage(f"features-s{seed}", [(tools, ["cache-features", "--source", images, "--dest", features,
                                                           "--enc-type", ENCODER, "--enc-weights", weights[seed],
                                                           "--kind", "full", "--workers", "0"])],
                            deps=("data", encoder_name(seed)), done=manifest_done(features)))
    runs = {}
    for seed in seeds:
        for method in parse_list(args.methods):
            name = run_name(method, seed)
            argv = ["--model", args.model, "--enc-type", ENCODER, "--encoder-depth", str(args.encoder_depth),
                    "--projector-dim", str(args.projector_dim), "--data-dir", data, "--resolution", str(res),
                    "--output-dir", exps, "--exp-name", name, "--batch-size", str(args.batch_size),
                    "--learning-rate", str(args.learning_rate), "--ema-decay", str(args.ema_decay),
                    "--max-train-steps", str(args.steps), "--checkpointing-steps", str(args.eval_every),
                    "--keep-last", "1", "--sampling-steps", str(args.steps), "--sample-num-steps", "25",
                    "--sample-cfg-scale", "1", "--log-every", "25", "--precision", "fp32", "--report-to", "none",
                    "--num-workers", "0", "--device", "cpu", "--seed", str(seed),
                    "--fid-every", str(args.eval_every), "--fid-metric", "digits",
                    "--fid-num-samples", str(args.fid_num_samples), "--fid-num-steps", str(args.fid_num_steps),
                    "--fid-mode", "sde", "--fid-cfg-scale", str(args.fid_cfg_scale),
                    "--fid-cls-cfg-scale", str(args.fid_cfg_scale), "--fid-seed", str(args.fid_seed),
                    "--fid-class-balanced", "--fid-batch-size", "125"] + METHODS[method]
            exp = os.path.join(exps, name)
            runs[name] = {"method": method, "seed": seed, "exp": exp, "argv": argv}

            def finished(exp=exp):
                final = read_metrics(os.path.join(exp, "metrics.jsonl")).get(args.steps, {})
                saved = [s for s, _ in checkpoint_paths(os.path.join(exp, "checkpoints"))]
                return any(k.startswith("fd_") for k in final) and args.steps in saved
            stages.append(Stage(name, [("train.py", argv)], deps=("data",) if method == "SiT" else (f"features-s{seed}",),
                                done=finished, env={} if method == "SiT" else {"REG_DINOV2_WEIGHTS": weights[seed]}))
    return stages, {"runs": runs, "weights": weights, "data": data}


# ----------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------

def now() -> str:
    return time.strftime("%H:%M:%S")


def command_line(script: str, argv: list) -> str:
    return " ".join(shlex.quote(a) for a in ["python", script, *argv])


def run_in_process(stage: Stage, threads: int) -> None:
    import torch
    saved_env = {k: os.environ.get(k) for k in stage.env}
    saved_threads = torch.get_num_threads()
    os.environ.update(stage.env)
    torch.set_num_threads(threads)
    try:
        for script, argv in stage.calls:
            print(f"$ {command_line(script, argv)}", flush=True)
            importlib.import_module(SCRIPTS[script]).main(list(argv))   # train.main leaves no accelerate state
    finally:
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Running:
    """A stage running as child processes, one call after the other, output appended to its log."""

    def __init__(self, stage: Stage, log_dir: str, threads: int):
        self.stage, self.calls, self.t0 = stage, list(stage.calls), time.time()
        self.log_path = os.path.join(log_dir, f"{stage.name}.log")
        self.env = dict(os.environ, **stage.env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc, self.log = None, open(self.log_path, "a")
        self._next()

    def _next(self) -> None:
        script, argv = self.calls.pop(0)
        self.log.write(f"$ {command_line(script, argv)}\n")
        self.log.flush()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def poll(self):
        """None while running; else the exit status of the stage (0 = every call succeeded)."""
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc == 0 and self.calls:
            self._next()
            return None
        self.log.close()
        return rc


def execute(stages: list[Stage], args, log_dir: str) -> dict:
    """Run the stages that are not done, respecting dependencies; returns {name: seconds or 'skipped'}."""
    timings, finished, pending = {}, set(), list(stages)
    for s in stages:
        if s.done and s.done():
            print(f"[{now()}] {s.name}: done already, skipped", flush=True)
            timings[s.name] = "skipped"
            finished.add(s.name)
    pending = [s for s in stages if s.name not in finished]
    if args.jobs <= 0:
        for s in pending:
            print(f"[{now()}] {s.name}: start", flush=True)
            t0 = time.time()
            run_in_process(s, args.threads)
            timings[s.name] = time.time() - t0
        return timings
    os.makedirs(log_dir, exist_ok=True)
    running: list[Running] = []
    failed = None
    while pending or running:
        for r in list(running):
            rc = r.poll()
            if rc is None:
                continue
            running.remove(r)
            if rc:
                failed = failed or (r.stage.name, rc, r.log_path)
                print(f"[{now()}] {r.stage.name}: FAILED (exit {rc}); see {r.log_path}", flush=True)
            else:
                timings[r.stage.name] = time.time() - r.t0
                finished.add(r.stage.name)
                print(f"[{now()}] {r.stage.name}: finished in {timings[r.stage.name]:.0f} s", flush=True)
        if failed:
            pending = []
        while len(running) < args.jobs:
            ready = next((s for s in pending if all(d in finished for d in s.deps)), None)
            if ready is None:
                break
            pending.remove(ready)
            running.append(Running(ready, log_dir, args.threads))
            print(f"[{now()}] {ready.name}: start (log {running[-1].log_path})\n    "
                  + "\n    ".join(f"$ {command_line(sc, av)}" for sc, av in ready.calls), flush=True)
        if pending and not running:
            raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages that did not finish")
        time.sleep(0.5)
    if failed:
        name, rc, path = failed
        raise SystemExit(f"stage {name} failed (exit {rc}); its log: {path}; rerun the same command to resume")
    return timings


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------

def mean_sd(values: list) -> tuple:
    import numpy as np
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def real_floor(args, k: int, draws: int = 20) -> tuple:
    """FD of K real digits (K/10 of each class, drawn at random, ``draws`` times, seeded) against all
    of them: what a generator that reproduced the data exactly would score at this K (the FD's
    small-sample bias). Returns (mean, sd) over the draws."""
    import numpy as np

    from evaluations.digits import DigitsMetric, load_digits_data, render_digits
    images8, labels = load_digits_data()
    if args.max_images:
        images8, labels = images8[:args.max_images], labels[:args.max_images]
    real = render_digits(images8, args.resolution)
    metric = DigitsMetric(reference_images=real)
    rng = np.random.default_rng(0)
    fds = []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=min(max(1, k // 10), int((labels == c).sum())),
                                          replace=False) for c in np.unique(labels)])
        fds.append(metric.evaluate(real[np.sort(pick)])["fd"])
    return mean_sd(fds)


def platform_name() -> str:
    """What the per-seed values depend on besides the code and the seeds: torch and the CPU kernel
    family it dispatches to (AVX2 / AVX512 round float reductions differently; the encoder's training
    amplifies that). tests/test_ablation_pins.py keeps its pins under this name."""
    import torch
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def collect(args, runs: dict) -> dict:
    from online_eval import suffix
    k = suffix(args.fid_num_samples)
    fd_key, acc_key = f"fd_{k}", f"accuracy_{k}"
    methods, seeds = parse_list(args.methods), parse_list(args.seeds, int)
    per_run, steps = {}, None
    for name, r in runs.items():
        rows = read_metrics(os.path.join(r["exp"], "metrics.jsonl"))
        evals = {s: row for s, row in sorted(rows.items()) if fd_key in row}
        per_run[name] = {"method": r["method"], "seed": r["seed"],
                         "fd": {s: row[fd_key] for s, row in evals.items()},
                         "accuracy": {s: row.get(acc_key) for s, row in evals.items()},
                         "eval_seconds": sum(row.get("eval_seconds", 0.0) for row in evals.values()),
                         "final_losses": {key: rows.get(args.steps, {}).get(key) for key in
                                          ("loss_mean", "proj_loss_raw", "loss_mean_cls_raw")}}
        steps = sorted(set(evals) if steps is None else set(steps) & set(evals))
    summary = {}
    for metric in ("fd", "accuracy"):
        summary[metric] = {}
        for m in methods:
            summary[metric][m] = {}
            for s in steps:
                vals = [per_run[run_name(m, seed)][metric][s] for seed in seeds]
                mu, sd = mean_sd(vals)
                summary[metric][m][s] = {"mean": mu, "sd": sd, "per_seed": vals}
    ordering = {}
    if all(m in methods for m in METHODS):
        for s in steps:
            fd = {m: [per_run[run_name(m, seed)]["fd"][s] for seed in seeds] for m in METHODS}
            n = range(len(seeds))
            ordering[s] = {"REG<REPA<SiT_seeds": sum(fd["REG"][i] < fd["REPA"][i] < fd["SiT"][i] for i in n),
                           "REG<REPA_seeds": sum(fd["REG"][i] < fd["REPA"][i] for i in n),
                           "REPA<SiT_seeds": sum(fd["REPA"][i] < fd["SiT"][i] for i in n),
                           "REG<SiT_seeds": sum(fd["REG"][i] < fd["SiT"][i] for i in n), "seeds": len(seeds),
                           "REPA-REG": mean_sd([fd["REPA"][i] - fd["REG"][i] for i in range(len(seeds))]),
                           "SiT-REPA": mean_sd([fd["SiT"][i] - fd["REPA"][i] for i in range(len(seeds))]),
                           "SiT-REG": mean_sd([fd["SiT"][i] - fd["REG"][i] for i in range(len(seeds))])}
    return {"metric_keys": [fd_key, acc_key], "steps": steps, "methods": methods, "seeds": seeds,
            "runs": per_run, "summary": summary, "ordering": ordering}


def fmt(cell: dict, digits: int, pct: bool = False) -> str:
    scale = 100.0 if pct else 1.0
    vals = ", ".join(f"{v * scale:.{digits}f}" for v in cell["per_seed"])
    unit = "%" if pct else ""
    if len(cell["per_seed"]) == 1:
        return f"{cell['mean'] * scale:.{digits}f}{unit}"
    return f"{cell['mean'] * scale:.{digits}f} ± {cell['sd'] * scale:.{digits}f}{unit} ({vals})"


def write_table(result: dict, path: str) -> str:
    methods, steps, seeds = result["methods"], result["steps"], result["seeds"]
    k = result["metric_keys"][0].split("_", 1)[1]
    lines = [f"FD (Frechet distance on a digit classifier's features, K = {k} samples; lower is better), "
             f"mean ± sd over seeds {', '.join(map(str, seeds))} (per-seed values in brackets). "
             f"Real digits at this K (K/10 per class drawn at random, 20 draws): FD {result['real_floor'][0]:.1f} "
             f"± {result['real_floor'][1]:.1f}.", "",
             "| step | " + " | ".join(f"{m} FD" for m in methods) + " |",
             "| ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(fmt(result["summary"]["fd"][m][s], 1) for m in methods) + " |")
    lines += ["", "Digit accuracy of the same samples (read by the built-in run's classifier; chance 10%):", "",
              "| step | " + " | ".join(f"{m} accuracy" for m in methods) + " |",
              "| ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(fmt(result["summary"]["accuracy"][m][s], 1, pct=True)
                                              for m in methods) + " |")
    if result["ordering"]:
        n = len(seeds)
        lines += ["", (f"The paper's orderings (lower FD), in how many of the {n} seeds (each seed: its own encoder "
                       "and training), and the FD gaps (mean ± sd over seeds; positive = the first method is worse):"),
                  "",
                  "| step | REG < REPA < SiT | REG < REPA | REPA < SiT | REG < SiT | REPA − REG | SiT − REPA | SiT − REG |",
                  "| ---: | :---: | :---: | :---: | :---: | ---: | ---: | ---: |"]
        for s in steps:
            o = result["ordering"][s]
            lines.append(f"| {s} | " + " | ".join(f"{o[k + '_seeds']}/{n}" for k in ORDERINGS) + " | "
                         + " | ".join(f"{o[g][0]:+.1f} ± {o[g][1]:.1f}" for g in ("REPA-REG", "SiT-REPA", "SiT-REG"))
                         + " |")
    platforms = sorted({f"{i['platform']} ({i['cpu']})" for i in result.get("invocations", []) if "platform" in i})
    if len(platforms) == 1:
        lines += ["", f"Measured on {platforms[0]}; the per-seed values are bit for bit on that platform only."]
    elif platforms:
        lines += ["", f"Measured on several platforms ({'; '.join(platforms)}): the stages of one seed may come "
                      "from different ones, so its values are not those of any single platform."]
    if result.get("encoders"):
        lines += ["", "The encoders (one per seed): class-token 10-NN accuracy on the 299 held-out digits "
                  "(random weights: " + ", ".join(f"{e['probe']['random']:.1%}" for e in result["encoders"].values())
                  + "): " + ", ".join(f"seed {seed} {e['probe']['trained']:.1%}" for seed, e in result["encoders"].items())
                  + "."]
    text = "\n".join(lines) + "\n"
    from fileio import atomic_write_bytes
    atomic_write_bytes(path, text.encode())
    return text


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"SiT": "tab:gray", "REPA": "tab:blue", "REG": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = result["steps"]
    for ax, metric, title in zip(axes, ("fd", "accuracy"), ("FD to the real digits (lower is better)",
                                                          "digit accuracy of the samples")):
        for m in result["methods"]:
            c = colours.get(m)
            for name, r in result["runs"].items():
                if r["method"] == m:
                    ax.plot(steps, [r[metric][s] for s in steps], color=c, alpha=0.35, lw=0.8)
            ax.plot(steps, [result["summary"][metric][m][s]["mean"] for s in steps], color=c, lw=2, marker="o",
                    label=f"{m} (mean of {len(result['seeds'])} seed{'s' if len(result['seeds']) > 1 else ''})")
        if metric == "fd":
            ax.axhline(result["real_floor"][0], color="k", ls="--", lw=0.8, label="real digits, same K")
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for m in parse_list(args.methods):
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    t0, load0 = time.time(), os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    stages, info = plan(args)
    print(f"[{now()}] {len(stages)} stages; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"{os.cpu_count()} CPUs; jobs {args.jobs}, {args.threads} thread(s) each", flush=True)
    timings = execute(stages, args, os.path.join(args.out, "logs"))
    result = collect(args, info["runs"])
    result["real_floor"] = real_floor(args, args.fid_num_samples)
    from fileio import atomic_write_json, read_json
    result["encoders"] = {}
    for seed, path in info["weights"].items():
        report = read_json(path + ".json")
        result["encoders"][seed] = {k: report[k] for k in ("sha256", "probe", "class_token_spread", "train_seconds",
                                                           "settings")}
    result["settings"] = {k: v for k, v in vars(args).items()}
    load1 = os.getloadavg()
    wall = time.time() - t0
    previous = read_json(os.path.join(args.out, "table.json")).get("invocations", []) if os.path.isfile(
        os.path.join(args.out, "table.json")) else []
    result["invocations"] = previous + [{"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                                         "wall_seconds": wall, "stage_seconds": timings,
                                         "load_average_start": load0, "load_average_end": load1,
                                         "seeds": args.seeds, "jobs": args.jobs, "threads": args.threads,
                                         "platform": platform_name(), "cpu": cpu_model()}]
    atomic_write_json(os.path.join(args.out, "table.json"), result)
    table = write_table(result, os.path.join(args.out, "table.md"))
    plot(result, os.path.join(args.out, "ablation.png"))
    print()
    print(table)
    print(f"wall time {wall / 60:.1f} min; load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    print(f"table: {os.path.join(args.out, 'table.md')} (and table.json); plot: {os.path.join(args.out, 'ablation.png')}")
    return result


if __name__ == "__main__":
    main()
