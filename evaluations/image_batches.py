"""Reading images for the evaluations: one array of an .npz in row batches (50K 256 px images are
~10 GB: never loaded whole), and image folders (sorted, ADM-cropped on request)."""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image

from preprocessing.transforms import center_crop_dhariwal

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class NpzArray:
    """One array of an .npz archive, read lazily in row batches.

    Use as a context manager: `with NpzArray(path, "arr_0") as a: a.shape, a.dtype, a.batches(64)`.
    Only the .npy header is parsed on entry, so shape/dtype checks are cheap.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "NpzArray":
        try:
            zf = self._stack.enter_context(zipfile.ZipFile(self.path))
        except zipfile.BadZipFile:
            raise ValueError(f"{str(self.path)!r} is not an .npz archive (np.savez output)") from None
        member = f"{self.key}.npy"
        if member not in zf.namelist():
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            self._stack.close()
            raise ValueError(f"{str(self.path)!r} has no array {self.key!r} (found {keys})")
        self._file = self._stack.enter_context(zf.open(member))
        version = np.lib.format.read_magic(self._file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
        else:
            shape, fortran, dtype = None, True, None  # unusual header: fall back to a full load
        self._whole = None
        if fortran or dtype is None or dtype.hasobject:
            with np.load(self.path, allow_pickle=False) as z:
                self._whole = np.ascontiguousarray(z[self.key])
            shape, dtype = self._whole.shape, self._whole.dtype
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def batches(self, batch_size: int):
        """Yield consecutive (<= batch_size, *shape[1:]) arrays covering all rows once."""
        n = self.shape[0]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            if self._whole is not None:
                yield self._whole[start : start + count]
                continue
            want = count * row_bytes
            data = self._file.read(want)
            if len(data) != want:
                raise ValueError(f"{str(self.path)!r}: {self.key} ends early (truncated file?)")
            yield np.frombuffer(data, dtype=self.dtype).reshape((count, *self.shape[1:]))


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays stored in an .npz archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    except zipfile.BadZipFile:
        raise ValueError(f"{str(path)!r} is not an .npz archive (np.savez output)") from None


def list_images(source: str | os.PathLike) -> list[Path]:
    """All image files under `source`, sorted by their path relative to it."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {str(source)!r} does not exist or is not a folder")
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    files.sort(key=lambda p: p.relative_to(source).as_posix())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(source)!r}")
    return files


def load_image(path: Path, resolution: int | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, ADM-cropped to resolution if given."""
    try:
        with PIL.Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
    if resolution is not None:
        return np.ascontiguousarray(center_crop_dhariwal(img, resolution))
    return np.asarray(img)


def source_images(source, batch_size: int = 64):
    """uint8 (B, H, W, 3) batches of a reference batch (.npz arr_0) or an image folder (every image)."""
    source = Path(source)
    if source.is_file():
        with NpzArray(source, "arr_0") as arr:
            yield from arr.batches(batch_size)
        return
    files = list_images(source)
    shape = None
    for i in range(0, len(files), batch_size):
        batch = [load_image(p, None) for p in files[i:i + batch_size]]
        shape = shape or batch[0].shape
        odd = next((p for p, img in zip(files[i:], batch) if img.shape != shape), None)
        if odd is not None:
            raise ValueError(f"reference folder {str(source)!r}: {odd.name} is not {shape[1]}x{shape[0]} like "
                             "the others; use images of one size (as EDM2's dataset_tool writes them)")
        yield np.stack(batch)
