"""Is each generated digit the digit it was asked for? A logistic-regression classifier is fitted
on scikit-learn's real 8x8 digits; every generated image (arr_0 of a generate.py .npz, labels in
arr_1) is reduced to the same 8x8 grey format and classified. Prints the per-class and overall
accuracy next to chance (10%), writes them as JSON, and a PNG grid with one row per class."""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluations.digits import fit_reader, load_digits_data, to_digits_format  # noqa: E402
from fileio import atomic_write_json  # noqa: E402
from online_eval import image_grid  # noqa: E402


def class_grid(images, labels, per_class=10):
    """Row k: the first ``per_class`` images sampled for digit k (black cells where there are fewer)."""
    cells = []
    for c in range(10):
        picks = images[labels == c][:per_class]
        cells += [picks, np.zeros((per_class - len(picks),) + images.shape[1:], dtype=np.uint8)]
    return image_grid(np.concatenate(cells), cols=per_class)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("samples", help=".npz from generate.py (arr_0 images, arr_1 labels)")
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-grid", required=True)
    args = p.parse_args(argv)
    images8, digit_labels = load_digits_data()
    real = images8.reshape(len(images8), 64)
    clf = fit_reader(real, digit_labels)
    with np.load(args.samples) as f:
        if "arr_1" not in f:
            p.error(f"{args.samples} has no labels (arr_1); sample it with generate.py")
        images, labels = f["arr_0"], f["arr_1"]
    if images.shape[1] % 8 or images.shape[2] % 8:
        p.error(f"image size {images.shape[1:3]} is not a multiple of 8")
    pred = clf.predict(to_digits_format(images))
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    result = {"accuracy": float((pred == labels).mean()), "chance": 0.1, "per_class": per_class,
              "num_samples": int(len(labels)), "classifier_train_accuracy": float(clf.score(real, digit_labels))}
    atomic_write_json(args.out_json, result)
    Image.fromarray(class_grid(images, labels)).save(args.out_grid)
    print(f"digit accuracy of the samples: {result['accuracy']:.1%} (chance 10%); per class: "
          + " ".join(f"{c}:{a:.0%}" for c, a in per_class.items()))


if __name__ == "__main__":
    main()
