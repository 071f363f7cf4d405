"""The built-in run: the whole REG pipeline on a laptop CPU with no downloads.

    python demo/pipeline.py [--out demo_out] [--steps 600] ...      (demo.sh calls this)

scikit-learn's bundled handwritten digits -> preprocessing (convert, fit-pca, encode,
cache-features) -> train.py -> generate.py -> evaluation (a digit classifier reads the samples;
the ADM evaluator runs end to end) -> loss curve. Every stage calls the project's own CLI entry
point with the arguments a user would type (printed as it goes), in this one process; rerunning
resumes or reuses what is done.

Stand-ins, clearly not the paper's parts: a linear patch codec fitted to the digits ("pca:FILE":
each 8x8 pixel patch -> its top 4 principal components, so a 64 px image becomes a 4x8x8 latent
like an SD-VAE's) instead of the SD-VAE, a RANDOM-weight tiny ViT ("random-vit-tiny") instead of
DINOv2, and random Inception weights for the ADM metrics (those numbers only show the evaluator
runs). Sizes are flags, so tests run the same pipeline small.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The built-in CPU run (see demo.sh).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", help="everything the run writes goes here")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (about 4.5 minutes on 2 cores)")
    p.add_argument("--num-samples", type=int, default=200, help="generated images (class-balanced, 20 per digit)")
    p.add_argument("--sample-steps", type=int, default=50, help="SDE steps of the samples")
    p.add_argument("--eval-images", type=int, default=100, help="images per side for the random-weight ADM metrics")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--model", default="SiT-T/2")
    p.add_argument("--max-images", type=int, default=None, help="only the first N digits (tests)")
    p.add_argument("--exp-name", default="reg-digits", help="the training run's folder under OUT/exps")
    p.add_argument("--shards", action="store_true",
                   help="pack the preprocessed data into the sharded layout (dataset_tools.py pack) and train on that")
    p.add_argument("--train-args", default="", help="extra train.py flags, e.g. the ladder's \"--routing sprint ...\"")
    return p


def up_to_date(target: str, *sources: str) -> bool:
    """A finished rerun skips a stage whose output is newer than its inputs (and says so)."""
    done = os.path.isfile(target) and all(os.path.getmtime(target) >= os.path.getmtime(s) for s in sources)
    if done:
        print(f"(up to date: {target})", flush=True)
    return done


def stage(title: str) -> None:
    print(f"== {title}", flush=True)


def call(entry, argv: list[str], prog: str):
    """Run a CLI entry point in-process, echoing the equivalent command line."""
    print("$ python " + " ".join(shlex.quote(str(a)) for a in [prog, *argv]), flush=True)
    return entry([str(a) for a in argv])


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import numpy as np

    import generate
    import train
    from demo import digit_accuracy, make_digits, plot_loss
    from evaluations import evaluator, reference
    from evaluations.inception import save_random_weights
    from fileio import atomic_save_npz
    from preprocessing import dataset_tools

    out, res = args.out, args.resolution
    data, exp = os.path.join(out, "data"), os.path.join(out, "exps", args.exp_name)
    tools = "preprocessing/dataset_tools.py"

    stage(f"1/6 dataset: scikit-learn digits as class folders ({res}x{res} RGB)")
    call(make_digits.main, ["--out", os.path.join(out, "raw"), "--size", res], "demo/make_digits.py")

    stage("2/6 preprocessing: convert, fit the stand-in codec, encode, cache encoder features")
    convert = ["convert", "--source", os.path.join(out, "raw"), "--dest", os.path.join(data, "images"),
               "--resolution", f"{res}x{res}", "--transform", "center-crop"]
    if args.max_images:
        convert += ["--max-images", args.max_images]
    call(dataset_tools.main, convert, tools)
    pca = os.path.join(data, "pca-f8c4.pt")
    call(dataset_tools.main, ["fit-pca", "--source", os.path.join(data, "images"), "--dest", pca,
                              "--factor", 8, "--channels", 4], tools)
    call(dataset_tools.main, ["encode", "--source", os.path.join(data, "images"), "--dest",
                              os.path.join(data, "vae-latents"), "--model-url", f"pca:{pca}"], tools)
    call(dataset_tools.main, ["cache-features", "--source", os.path.join(data, "images"), "--enc-type",
                              "random-vit-tiny", "--kind", "full"], tools)

    train_data = data
    if args.shards:                     # the same samples in the same order: the same run
        train_data = os.path.join(out, "data-shards")
        call(dataset_tools.main, ["pack", "--source", data, "--dest", train_data, "--shard-size", 256], tools)

    stage(f"3/6 training {args.model} + REG for {args.steps} steps")
    # Demo-sized recipe: a higher learning rate and a short EMA (0.99): the run is only minutes long.
    call(train.main, ["--model", args.model, "--enc-type", "random-vit-tiny", "--encoder-depth", 2,
                      "--projector-dim", 256, "--data-dir", train_data, "--resolution", res,
                      "--output-dir", os.path.join(out, "exps"), "--exp-name", args.exp_name, "--batch-size", 64,
                      "--learning-rate", "1e-3", "--ema-decay", 0.99, "--max-train-steps", args.steps,
                      "--checkpointing-steps", 200, "--keep-last", 2, "--sampling-steps", 200,
                      "--sample-num-steps", 30, "--sample-cfg-scale", 2, "--log-every", args.log_every,
                      "--precision", "fp32", "--report-to", "none", "--num-workers", 1, *shlex.split(args.train_args)],
         "train.py")
    from checkpoint import checkpoint_paths
    ckpt = checkpoint_paths(os.path.join(exp, "checkpoints"))[-1][1]                    # the newest

    stage(f"4/6 sampling {args.num_samples} digits (SDE, {args.sample_steps} steps, cfg 2 on image and class token)")
    samples = call(generate.main, ["--ckpt", ckpt, "--mode", "sde", "--num-steps", args.sample_steps,
                                   "--cfg-scale", 2.0, "--cls-cfg-scale", 2.0, "--num-fid-samples", args.num_samples,
                                   "--per-proc-batch-size", 100, "--class-balanced",
                                   "--sample-dir", os.path.join(out, "samples"), "--name", args.exp_name], "generate.py")

    stage("5/6 evaluation: digit classifier on the samples; ADM metrics (random Inception weights)")
    tag = "" if args.exp_name == "reg-digits" else f"_{args.exp_name}"
    accuracy_json = os.path.join(out, f"digit_accuracy{tag}.json")
    grid = os.path.join(out, f"samples_by_class{tag}.png")
    if not up_to_date(accuracy_json, samples) or not up_to_date(grid, samples):
        call(digit_accuracy.main, [samples, "--out-json", accuracy_json, "--out-grid", grid], "demo/digit_accuracy.py")
    weights = os.path.join(out, "inception-RANDOM.pth")
    if not os.path.isfile(weights):
        save_random_weights(weights)
    ref = os.path.join(out, "ref.npz")
    if not os.path.isfile(ref):
        call(reference.main, [os.path.join(data, "images"), ref, "--num-images",
                              min(args.eval_images, args.max_images or args.eval_images), "--no-stats"],
             "evaluations/reference.py")
    subset = os.path.join(out, f"samples_eval{tag}.npz")
    if not up_to_date(subset, samples):
        with np.load(samples) as f:
            atomic_save_npz(subset, arr_0=f["arr_0"][:args.eval_images])
    metrics = subset.removesuffix(".npz") + ".metrics.json"
    if not up_to_date(metrics, subset, ref, weights):
        call(evaluator.main, [ref, subset, "--inception-weights", weights, "--fid-method", "lowrank", "--device",
                              "cpu"], "evaluations/evaluator.py")

    stage("6/6 loss curve")
    curve = os.path.join(out, f"loss_curve{tag}.png")
    history = os.path.join(exp, "metrics.jsonl")
    if not up_to_date(curve, history):
        call(plot_loss.main, [history, "--out", curve], "demo/plot_loss.py")

    paths = {"checkpoint": ckpt, "samples by class": grid + "   (row k = digit k)",
             "EMA sample grids": os.path.join(exp, "samples") + "/", "digit accuracy": accuracy_json,
             "ADM metrics": metrics + "   (RANDOM Inception weights: pipeline check only)",
             "loss curve": curve}
    print()
    for name, path in paths.items():
        print(f"{name + ':':19s}{path}")
    return {"checkpoint": ckpt, "samples": samples, "accuracy_json": accuracy_json, "exp": exp}


if __name__ == "__main__":
    main()
