"""Plot train.py's metrics.jsonl (image, class-token and alignment losses) to a PNG."""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str) -> dict:
    """{step: record} of a metrics.jsonl; the latest record of a step wins, a line cut short by a
    kill is skipped, a missing file is empty."""
    rows = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                rows[row["step"]] = row
    except FileNotFoundError:
        pass
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("metrics", help="{output-dir}/{exp-name}/metrics.jsonl")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not os.path.isfile(args.metrics):
        p.error(f"{args.metrics} does not exist")
    by_step = read_metrics(args.metrics)
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ["loss_mean", "loss_mean_cls_raw", "proj_loss_raw"],
                              ["image v-loss", "class-token v-loss (raw)", "alignment (neg. cosine, raw)"]):
        ax.plot(steps, [by_step[s][key] for s in steps])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"loss curve: {args.out}")


if __name__ == "__main__":
    main()
