"""Plot train.py's metrics.jsonl (image, class-token and alignment losses) to a PNG."""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("metrics", help="{output-dir}/{exp-name}/metrics.jsonl")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    by_step = {}
    with open(args.metrics) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row  # a resumed run re-logs some steps: keep the latest
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ["loss_mean", "loss_mean_cls", "proj_loss"],
                              ["image v-loss", "class-token v-loss (raw)", "alignment (neg. cosine, raw)"]):
        ax.plot(steps, [by_step[s][key] for s in steps])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"loss curve: {args.out}")


if __name__ == "__main__":
    main()
