"""Image transforms of the preprocessing, shared with the evaluation's reference batches.

``center-crop-dhariwal`` is ADM's ImageNet crop (guided-diffusion's ``center_crop_arr``), the one
the REG/REPA releases and ADM's reference batches use; it must stay pixel-exact.
"""
from __future__ import annotations

import numpy as np
import PIL.Image

TRANSFORMS = ("center-crop-dhariwal", "center-crop", "none")


def center_crop_dhariwal(img: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's ImageNet crop: BOX-halve while the short side >= 2 * size, BICUBIC-scale the short
    side to size (rounding both sides), then take the centre size x size window."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=PIL.Image.BOX)
    ratio = size / min(img.size)
    img = img.resize((round(img.width * ratio), round(img.height * ratio)), resample=PIL.Image.BICUBIC)
    arr = np.asarray(img)                                           # (H, W, 3) uint8
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def center_crop(img: PIL.Image.Image, size: int) -> np.ndarray:
    """Plain crop: the centred square of side min(H, W), LANCZOS-resized to size x size."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    side = min(h, w)
    arr = arr[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
    return np.asarray(PIL.Image.fromarray(arr).resize((size, size), resample=PIL.Image.LANCZOS))


def apply_transform(img: PIL.Image.Image, transform: str, size: int) -> np.ndarray:
    if transform == "center-crop-dhariwal":
        return center_crop_dhariwal(img, size)
    if transform == "center-crop":
        return center_crop(img, size)
    return np.asarray(img)
