"""A metric that means something on the built-in digits: a Frechet distance on a digit classifier's
features (FD), between generated and real digits, and the digit accuracy of the samples.

    metric = DigitsMetric()                       # classifier trained (seeded, ~1 s), reference lazily
    acts = metric.activations(images, labels)     # uint8 (N, H, W, 3) + the labels they were asked for
    metric.metrics_from_activations([acts])       # {"fd": ..., "accuracy": ...}

    python evaluations/digits.py SAMPLES.npz      # the same numbers for a generate.py batch

It follows the evaluator's interface (``activations`` -> dict of arrays, ``metrics_from_activations``
on the gathered list in image order), so ``train.py --fid-every N --fid-metric digits`` logs
``fd_<K>`` and ``accuracy_<K>`` during training (online_eval.py).

* Images are reduced to scikit-learn's digit format (8 x 8 grey, 0..16; ``to_digits_format``, a box
  average, as demo/digit_accuracy.py reads samples), so any resolution that is a multiple of 8 works.
* Features: the 64-wide penultimate layer (after its ReLU, like Inception's pool features) of a small
  MLP classifier (64 -> 256 -> 64 -> 10) trained on all 1,797 real digits, full batch, seeded: the
  same weights every time on a given machine and thread count.
* FD: ``evaluations.metrics.activation_statistics`` and ``frechet_distance``, ADM's FID code, between
  the samples' statistics and the reference's. The reference is every real digit rendered as the
  built-in data renders it (demo/make_digits.py: 8 x 8 -> bicubic to the samples' size, RGB) and
  reduced again, so real and generated digits take the same path; or ``reference_images`` given.
  Like FID, FD is biased upwards at small sample counts: compare numbers of the same K only.
* Accuracy: the fraction of samples that scikit-learn's logistic regression fitted on the real digits
  (exactly demo/digit_accuracy.py's reader) reads as the label they were generated for. Needs the
  labels; without them only ``fd`` is returned.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import from the repository root
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from evaluations import metrics  # noqa: E402

FEATURE_DIM = 64
CLASSIFIER_SEED = 0
CLASSIFIER_STEPS = 400
_CACHE: dict = {}


def load_digits_data():
    """scikit-learn's bundled digits: (images (1797, 8, 8) on 0..16, labels (1797,))."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def render_digits(images8: np.ndarray, size: int) -> np.ndarray:
    """8 x 8 digits (0..16) -> uint8 (N, size, size, 3), exactly as demo/make_digits.py writes them."""
    from PIL import Image
    out = np.empty((len(images8), size, size, 3), np.uint8)
    for i, img in enumerate(images8):
        grey = Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(grey.convert("RGB"))
    return out


def to_digits_format(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 64) grey 8 x 8 on the 0..16 scale of sklearn's digits (box average)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 8 or images.shape[2] % 8:
        raise ValueError(f"expected images (N, H, W, 3) with H and W multiples of 8, got {images.shape}")
    grey = images.astype(np.float64).mean(axis=-1)
    n, h, w = grey.shape
    small = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (small / 255.0 * 16.0).reshape(n, 64)


class DigitClassifier(torch.nn.Module):
    """64 -> 256 -> 64 (features) -> 10 on 8 x 8 digits scaled to 0..1."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                        torch.nn.Linear(256, FEATURE_DIM), torch.nn.ReLU())
        self.head = torch.nn.Linear(FEATURE_DIM, 10)

    def features(self, x16: torch.Tensor) -> torch.Tensor:
        return self.body(x16 / 16.0)

    def forward(self, x16: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x16))


def train_classifier(x16: np.ndarray, y: np.ndarray, seed: int = CLASSIFIER_SEED,
                     steps: int = CLASSIFIER_STEPS) -> DigitClassifier:
    """Full-batch AdamW on (N, 64) digits (0..16); seeded, the global RNG untouched, on one thread
    (the same weights whatever the machine's thread count; on a busy 2-core machine also faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitClassifier()
            x = torch.as_tensor(x16, dtype=torch.float32)
            y = torch.as_tensor(y, dtype=torch.long)
            opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def fit_reader(x16: np.ndarray, y: np.ndarray):
    """demo/digit_accuracy.py's reader: logistic regression on the real 8 x 8 digits."""
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=5000).fit(x16, y)


class DigitsMetric:
    """FD on a digit classifier's features (and the samples' digit accuracy), for repeated use.

    ``reference_images``: uint8 (N, H, W, 3) to compare with instead of all real digits (tests).
    ``device`` is accepted for the evaluator's interface; the networks are tiny and run on the CPU.
    Several processes: each calls ``activations`` on its images (and labels), one process calls
    ``metrics_from_activations`` on the gathered list (image order); same numbers as one process."""

    wants_labels = True

    def __init__(self, device=None, reference_images=None):
        self.device = device
        images8, self.real_labels = load_digits_data()
        self.real_images8 = images8
        x16 = images8.reshape(len(images8), 64)
        if "networks" not in _CACHE:                # the same data and seed every time: fit once per process
            _CACHE["networks"] = (train_classifier(x16, self.real_labels), fit_reader(x16, self.real_labels))
        self.classifier, self.reader = _CACHE["networks"]
        self.classifier_train_accuracy = float(
            (self.classifier(torch.as_tensor(x16, dtype=torch.float32)).argmax(1).numpy() == self.real_labels).mean())
        self._reference_images = reference_images
        self._ref_stats = {}                        # resolution (or "given") -> (mu, sigma)

    # ---- features ----
    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        return self._features(to_digits_format(images))

    def _features(self, x16: np.ndarray) -> np.ndarray:
        return self.classifier.features(torch.as_tensor(x16, dtype=torch.float32)).numpy().astype(np.float64)

    def activations(self, images, labels=None) -> dict:
        """uint8 (N, H, W, 3) (+ labels (N,)) -> {"features" (N, 64), "pred" (N,), "labels" (N,) or -1s}."""
        images = np.asarray(images)
        n = len(images)
        if n == 0:
            return {"features": np.zeros((0, FEATURE_DIM)), "pred": np.zeros(0, np.int64),
                    "labels": np.zeros(0, np.int64), "size": np.zeros(0, np.int64)}
        x16 = to_digits_format(images)
        pred = self.reader.predict(x16).astype(np.int64)
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(n)
        return {"features": self._features(x16), "pred": pred, "labels": labels,
                "size": np.full(n, images.shape[1], np.int64)}

    # ---- reference ----
    def reference_statistics(self, size: int):
        """(mu, sigma) of the reference: the given images, or every real digit rendered at ``size`` px."""
        key = "given" if self._reference_images is not None else int(size)
        if key not in self._ref_stats:
            ref = (self._reference_images if self._reference_images is not None
                   else render_digits(self.real_images8, int(size)))
            self._ref_stats[key] = metrics.activation_statistics(self.features(ref))
        return self._ref_stats[key]

    def metrics_from_activations(self, acts) -> dict:
        """{"fd": Frechet distance to the reference, "accuracy": digit accuracy (when labelled)}."""
        if isinstance(acts, (list, tuple)):
            acts = {k: np.concatenate([a[k] for a in acts]) for k in acts[0]}
        feats = acts["features"]
        if len(feats) < 2:
            raise ValueError(f"need at least 2 images for a Frechet distance, got {len(feats)}")
        mu, sigma = metrics.activation_statistics(feats)
        ref_mu, ref_sigma = self.reference_statistics(int(acts["size"][0]))
        out = {"fd": metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)}
        labels = acts["labels"]
        if (labels >= 0).all():
            out["accuracy"] = float((acts["pred"] == labels).mean())
        return out

    def evaluate(self, images, labels=None) -> dict:
        return self.metrics_from_activations(self.activations(images, labels))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="FD (digit-classifier features) and digit accuracy of a sample batch.")
    p.add_argument("samples", help=".npz from generate.py (arr_0 uint8 images, arr_1 labels if present)")
    args = p.parse_args(argv)
    with np.load(args.samples) as f:
        images = f["arr_0"]
        labels = f["arr_1"] if "arr_1" in f.files else None
    result = DigitsMetric().evaluate(images, labels)
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()) + f"  ({len(images)} images)")
    return result


if __name__ == "__main__":
    main()
