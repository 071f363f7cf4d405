"""Write scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes; no download)
as an ImageNet-style folder: OUT/<digit>/<index>.png, upsampled (bicubic) to --size pixels,
white digit on black, RGB. Used by demo.sh as a small, real, labelled dataset."""
import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluations.digits import render_digits  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    from sklearn.datasets import load_digits

    digits = load_digits()
    done = os.path.join(args.out, ".complete")
    if os.path.exists(done):
        print(f"{args.out}: already written")
        return
    for i, (img, label) in enumerate(zip(render_digits(digits.images, args.size), digits.target)):
        folder = os.path.join(args.out, f"{label}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
    open(done, "w").close()
    print(f"{args.out}: {len(digits.images)} images in 10 classes at {args.size}x{args.size}")


if __name__ == "__main__":
    main()
