"""Training data: raw uint8 images, SD-VAE latent moments, labels, and optional cached encoder outputs.

Reads two on-disk layouts under one ``data_dir`` (details in preprocessing/README.md):

* ours, written by ``preprocessing/dataset_tools.py``: one folder per step, each certified
  complete by a ``manifest.json`` written last --
  ``images/`` (PNG + dataset.json), ``vae-latents/`` (.npy [mean, std] per image, same relative
  name as its image) and ``features-<encoder>-<cls|full>/`` (fp16 chunks of cached encoder outputs);
* the release's: an image folder (``images/`` as in REPA, or ``imagenet_256_vae/`` as in REG)
  next to ``vae-sd/`` (``img-mean-std-XXXXXXXX.npy`` + dataset.json).

Images, latents and features are paired by name, never by sorted position; a missing
counterpart is an error naming the file. Checked while reading (README, 'Checks while training'):
counts against the manifests, each feature row against its crc32 (feature_cache.py, which also
bounds the open chunk files), every latent and feature row for NaN/inf. Per-item work is one PNG decode straight to uint8
(PIL, no float conversion) and one small ``np.load``; file lists are kept in numpy
byte arrays so forked DataLoader workers do not copy them (no per-string refcounts).
"""
from __future__ import annotations

import errno
import io
import os

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from feature_cache import ChecksumError, ChunkReader, nonfinite_count
from fileio import read_json
from models.autoencoder import RELEASE_ENCODER, SD_VAE_BIAS, SD_VAE_SCALE, codec_identity

#################################################################################
#                        On-disk layout (shared with the tools)                  #
#################################################################################

MANIFEST = "manifest.json"          # written last: its presence certifies a complete step
PARTIAL = ".partial.json"           # written first: a step that started and has not finished
LABELS = "dataset.json"             # release-compatible {"labels": [[relpath, class], ...]}

OUR_IMAGES_DIR = "images"
OUR_LATENTS_DIR = "vae-latents"
RELEASE_IMAGE_DIRS = ("images", "imagenet_256_vae", "imagenet_512_vae")
RELEASE_LATENT_DIRS = ("vae-sd", "vae-sd-256", "vae-sd-512")
RELEASE_LATENT_PREFIX = "img-mean-std-"
RELEASE_AUTOENCODER = RELEASE_ENCODER                 # what the release's encode step uses
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def features_dir_name(enc_type: str, kind: str) -> str:
    return f"features-{enc_type}-{kind}"


def image_key(relpath: str) -> str:
    """'00000/img00000000.png' -> '00000/img00000000' (the name shared across steps)."""
    return os.path.splitext(relpath.replace("\\", "/"))[0]


def latent_key(relpath: str) -> str:
    """'00000/img00000000.npy' or release '00000/img-mean-std-00000000.npy' -> '00000/img00000000'."""
    key = os.path.splitext(relpath.replace("\\", "/"))[0]
    head, base = os.path.split(key)
    if base.startswith(RELEASE_LATENT_PREFIX):
        base = "img" + base[len(RELEASE_LATENT_PREFIX):]
    return f"{head}/{base}" if head else base


def read_manifest(step_dir: str) -> dict | None:
    path = os.path.join(step_dir, MANIFEST)
    return read_json(path) if os.path.isfile(path) else None


def read_labels(step_dir_or_json: str) -> dict[str, int] | None:
    """{relpath: class} from a dataset.json, or None when absent or its labels are null."""
    path = step_dir_or_json
    if os.path.isdir(path):
        path = os.path.join(path, LABELS)
    if not os.path.isfile(path):
        return None
    labels = read_json(path).get("labels")
    if labels is None:
        return None
    return {str(name).replace("\\", "/"): int(cls) for name, cls in labels}


def list_files(root: str, exts: tuple[str, ...]) -> list[str]:
    """Sorted relative paths ('/'-separated) of files under root with one of the extensions."""
    out = []
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    stack.append(e.path)
                elif e.name.lower().endswith(exts):
                    out.append(os.path.relpath(e.path, root).replace("\\", "/"))
    return sorted(out)


def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB tensor; no float pass, one copy out of PIL.

    (torchvision.io.decode_png is a little faster but deprecated since torchvision 0.29.)
    """
    with PIL.Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.array(img)                                             # (H, W, 3) uint8, writable
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: decoded to shape {arr.shape}, expected (H, W, 3)")
    return torch.from_numpy(arr).permute(2, 0, 1)                       # (3, H, W) view


def read_image(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return decode_image(f.read(), path)


def check_step_complete(step_dir: str, what: str) -> dict | None:
    """Manifest of a step folder; a clear error when the step was interrupted."""
    manifest = read_manifest(step_dir)
    if manifest is None and os.path.isfile(os.path.join(step_dir, PARTIAL)):
        raise ValueError(f"{what} folder {step_dir} is incomplete (interrupted run?): rerun the same "
                         f"preprocessing command to finish it")
    return manifest


def _preprocessing_differs(name: str, manifest: dict) -> str | None:
    """Why a feature cache's encoder facts differ from the registry's now (None: they agree).
    Caches written before the record existed come from the DINOv2-style encoders only, whose
    preprocessing has not changed."""
    from models.encoders import encoder_record, encoder_spec

    recorded = manifest.get("encoder_record")
    if recorded is None:
        family = encoder_spec(name).family.family
        return None if family in ("dinov2", "random") else "no record of its preprocessing"
    current = encoder_record(name, int(manifest["resolution"]))
    keys = [k for k in current if recorded.get(k) != current[k]]
    if keys:
        return f"other preprocessing or token rules (differs in: {', '.join(keys)})"
    return None


class DataFileError(ValueError):
    """A dataset file that cannot be read; the message names it, the step that wrote it, and the fix."""


class ResourceLimitError(RuntimeError):
    """A dataset file that could not be read for want of a resource of this machine (open files,
    memory): not damage, so never replaced by skip_bad; the message names the limit and the fix."""


DATA_ERRORS = (DataFileError, ResourceLimitError)       # what a training loop reports in one line

# errno values of a machine out of a resource, never of a damaged file
RESOURCE_ERRNOS = {errno.EMFILE: "too many open files in this process",
                   errno.ENFILE: "too many open files on this machine",
                   errno.ENOMEM: "out of memory"}


def resource_limit_error(path: str, error: BaseException) -> ResourceLimitError | None:
    """A ResourceLimitError for an error raised while reading path, if it is one (else None)."""
    if isinstance(error, MemoryError):
        why = RESOURCE_ERRNOS[errno.ENOMEM]
    elif isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
        why = RESOURCE_ERRNOS[error.errno]
    else:
        return None
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fix = (f"raise the open-file limit (ulimit -n: now {soft}, hard limit {hard}) or use fewer --num-workers"
               if error.errno == errno.EMFILE else "raise fs.file-max or run fewer processes on this machine")
    else:
        fix = "use fewer --num-workers or a smaller --batch-size, or free memory on this machine"
    return ResourceLimitError(f"cannot read {path}: {why} -- a resource limit of this machine, not damaged "
                              f"data; {fix}")


#################################################################################
#                                   Dataset                                      #
#################################################################################

def _as_bytes_array(strings) -> np.ndarray:
    return np.array([s.encode("utf-8") for s in strings], dtype=np.bytes_)


class REGDataset(Dataset):
    """(image, latent moments, label[, cached encoder outputs]) per training example.

    use_features: "auto" (use caches when every encoder in enc_types has one; full preferred),
    True (same, but an error when missing), False, or "full" / "cls" (that kind, else an error).
    "cls" with load_images=True serves a run that needs patch tokens it has no cache for: the
    cached global tokens plus the images, for the trainer to run the encoder online.
    enc_types: encoders whose cached outputs to return, in this order (None: every cached one);
    release spellings are accepted (``dinov2reg-vit-b``).
    load_images: None -> return images unless a full feature cache makes them unnecessary.
    images_dir / latents_dir: override the folder discovery (names under data_dir, or paths).
    encoder_weights: {name: models.encoders.weights_record(...)} of the encoders this run will
    use; a cache made with other weights is refused. Caches made with preprocessing other than
    the registry's are always refused.
    skip_bad: replace a damaged or non-finite item by the next readable one (see __getitem__).
    allow_partial: accept listings shorter than their manifests' counts (noted in ``notes``).

    Attributes: num_classes, resolution, latent_shape = moments_shape = (2C, h, w) (one stored
    item), latent_channels = C, autoencoder_spec / latent_scale / latent_bias / codec_identity
    (from the latents manifest), feature_kind ("none" | "cls" | "full"), enc_types,
    encoder_widths {name: Z}, feature_records {name: {"path", "dtype", "encoder_record", "weights"}}.

    Items are dicts: "image" uint8 (3, R, R); "moments" float32 (2C, h, w); "label" int64 ();
    with features, "enc_cls" list of (Z_k,) and, for a full cache, "enc_tokens" list of
    (1 + T, Z_k), one entry per encoder, in the cache's dtype (float16 by default; the default
    collate stacks each entry); with skip_bad, "skipped" int64 () (the index this item replaces, or -1;
    skipped_notes turns it into the warning). Read errors: DataFileError (the file, its sample index, the
    fix) or ResourceLimitError (open files, memory: never replaced by skip_bad).
    """

    def __init__(self, data_dir: str, use_features: bool | str = "auto", enc_types: list[str] | None = None,
                 load_images: bool | None = None, images_dir: str | None = None,
                 latents_dir: str | None = None, encoder_weights: dict | None = None, skip_bad: bool = False,
                 allow_partial: bool = False):
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory {data_dir} does not exist")
        enc_types = self._start(data_dir, use_features, enc_types, encoder_weights, skip_bad)
        self._counts = []               # (manifest, what it records, what is listed), checked below
        steps = self._scan_steps(data_dir)

        keys, latent_files = self._index_latents(data_dir, steps, latents_dir)
        self._index_features(steps, use_features, enc_types, keys)
        self._index_images(data_dir, steps, images_dir, load_images, keys, latent_files)
        self._check_counts(allow_partial)

    # ------------------------------------------------------------------ indexing
    def _index_latents(self, data_dir, steps, latents_dir):
        """The item list, labels and codec of the latents step; returns (keys, latent files)."""
        self.latents_dir, latent_manifest = self._find_latents(data_dir, steps, latents_dir)
        latent_labels = read_labels(self.latents_dir)
        if latent_labels is None:
            raise FileNotFoundError(f"no labels in {os.path.join(self.latents_dir, LABELS)}: the latents "
                                    f"folder needs its dataset.json (written by the encode step)")
        if latent_manifest is not None:
            latent_files = sorted(latent_labels)        # certified by the manifest
            if "num_files" in latent_manifest:
                self._counts.append((self.latents_dir, "latent files", int(latent_manifest["num_files"]),
                                     f"its {LABELS} lists", len(latent_files)))
        else:
            latent_files = list_files(self.latents_dir, (".npy",))
            unlabeled = [f for f in latent_files if f not in latent_labels]
            if unlabeled:
                raise ValueError(f"{len(unlabeled)} latent files have no label in {LABELS}, e.g. "
                                 f"{os.path.join(self.latents_dir, unlabeled[0])}")
        if not latent_files:
            raise ValueError(f"no latent files in {self.latents_dir}")
        keys = [latent_key(f) for f in latent_files]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two latent files in {self.latents_dir} map to the same image name")
        self._keys = _as_bytes_array(keys)
        self._latent_files = _as_bytes_array(latent_files)
        self.labels = np.array([latent_labels[f] for f in latent_files], dtype=np.int64)

        first = np.load(os.path.join(self.latents_dir, latent_files[0]), mmap_mode="r")
        self.moments_shape = tuple(int(s) for s in first.shape)                 # (2C, h, w)
        if len(self.moments_shape) != 3 or self.moments_shape[0] % 2:
            raise ValueError(f"latent file {latent_files[0]} has shape {self.moments_shape}, "
                             f"expected (2C, h, w) moments")
        # latent_shape is the shape of one stored item, i.e. the moments (2C, h, w), as train.py reads it.
        self.latent_shape = self.moments_shape
        self.latent_channels = self.moments_shape[0] // 2                         # C of z
        if latent_manifest is not None:
            self.autoencoder_spec = latent_manifest["autoencoder"]
            self.latent_scale = float(latent_manifest["scale"])
            self.latent_bias = float(latent_manifest["bias"])
            self.num_classes = int(latent_manifest["num_classes"])
            self.resolution = int(latent_manifest["resolution"])
            # manifests before the codec identity was recorded: derived from the spec
            self.codec_identity = latent_manifest.get("codec") or codec_identity(self.autoencoder_spec)
        else:
            self.autoencoder_spec = RELEASE_AUTOENCODER
            self.latent_scale, self.latent_bias = SD_VAE_SCALE, SD_VAE_BIAS
            self.num_classes = int(self.labels.max()) + 1
            self.resolution = None      # from the first image below, else latent size x 8
            self.codec_identity = codec_identity(self.autoencoder_spec)
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"labels in {self.latents_dir} fall outside [0, {self.num_classes})")

        return keys, latent_files

    def _index_features(self, steps, use_features, enc_types, keys):
        """The cached encoder features (if any) and each item's row in them."""
        self._features = []             # [(name, dir, manifest)] in enc_types order
        self.feature_kind = self._choose_features(steps, use_features, enc_types)
        self.enc_types = [name for name, _, _ in self._features]
        self.encoder_widths = {name: int(m["embed_dim"]) for name, _, m in self._features}
        self.feature_records = {name: {"path": fdir, "kind": m["feature_kind"], "dtype": m.get("dtype", "float16"),
                                       "encoder_record": m.get("encoder_record"), "weights": m.get("weights")}
                                for name, fdir, m in self._features}
        self._feature_rows, self._readers = [], []
        for name, fdir, manifest in self._features:
            row_of = {k: i for i, k in enumerate(manifest["keys"])}
            missing = [k for k in keys if k not in row_of]
            if missing:
                raise ValueError(f"{len(missing)} images have no cached {name} features in {fdir}, e.g. "
                                 f"{missing[0]}; rerun cache-features on the same images folder")
            self._counts.append((fdir, "cached images", len(row_of), "the training set has", len(keys)))
            self._feature_rows.append(np.array([row_of[k] for k in keys], dtype=np.int64))
            del manifest["keys"]        # a big list of str: do not carry it into every worker
            sums = manifest.pop("checksums", None)      # as big: a uint32 array instead
            row_crc = np.array(sums["rows"], dtype=np.uint32) if sums else None
            if row_crc is None:
                self.notes.append(f"note: the feature cache {fdir} has no checksums (written before they were "
                                  f"recorded): its rows are not verified; cache-features into a new folder adds them")
            self._readers.append(ChunkReader(fdir, manifest, row_crc))

    def _index_images(self, data_dir, steps, images_dir, load_images, keys, latent_files):
        """The image paired with each latent (by name), when images are loaded; the resolution."""
        self.load_images = (self.feature_kind != "full") if load_images is None else bool(load_images)
        self.images_dir = None
        self._image_files = None
        if self.load_images:
            self.images_dir, image_files = self._find_images(data_dir, steps, images_dir)
            by_key = {image_key(f): f for f in image_files}
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise ValueError(f"{len(missing)} latents have no image in {self.images_dir}, e.g. the "
                                 f"image for {os.path.join(self.latents_dir, latent_files[keys.index(missing[0])])}")
            extra = len(by_key) - len(keys)
            if extra > 0:
                key_set = set(keys)
                orphan = next(f for k, f in by_key.items() if k not in key_set)
                raise ValueError(f"{extra} images in {self.images_dir} have no latents, e.g. {orphan}; "
                                 f"rerun the encode step on this images folder")
            self._image_files = _as_bytes_array([by_key[k] for k in keys])
            if self.resolution is None:
                self.resolution = int(read_image(os.path.join(self.images_dir, by_key[keys[0]])).shape[-1])
        if self.resolution is None:
            self.resolution = self.moments_shape[-1] * 8     # release SD-VAE: /8
        for name, fdir, manifest in self._features:
            if int(manifest["resolution"]) != self.resolution:
                raise ValueError(f"features in {fdir} were computed at {manifest['resolution']} px but the "
                                 f"dataset is {self.resolution} px")

    def _start(self, data_dir: str, use_features, enc_types, encoder_weights, skip_bad) -> list[str] | None:
        """What every layout's reader sets up first (the sharded one too); returns the parsed encoders."""
        if use_features not in (True, False, "auto", "full", "cls"):
            raise ValueError(f"use_features must be True, False, 'auto', 'full' or 'cls', got {use_features!r}")
        if isinstance(enc_types, str):
            enc_types = [e for e in enc_types.split(",") if e]
        if enc_types:
            from models.encoders import parse_enc_types
            enc_types = parse_enc_types(enc_types)
        self._encoder_weights = encoder_weights or {}
        self.skip_bad, self._warned = bool(skip_bad), set()
        self.data_dir = data_dir
        self.notes = []                 # one-time remarks for the caller's log (old caches, accepted counts)
        return enc_types

    def _check_counts(self, allow_partial: bool) -> None:
        """Each step's manifest records how many items it wrote; a listing (dataset.json) or training set
        with another count means data was lost or edited away: an error, unless allow_partial."""
        off = [f"{os.path.join(d, MANIFEST)} records {n} {what} but {listed} {m}"
               for d, what, n, listed, m in self._counts if n != m]
        if not off:
            return
        text = "; ".join(off)
        if not allow_partial:
            raise ValueError(f"the data disagrees with its manifests: {text}. Restore the missing entries (or rerun "
                             f"the step that wrote them), or pass --allow-partial-data to train on the "
                             f"{len(self)} items listed")
        self.notes.append(f"note: training on {len(self)} items although {text} (--allow-partial-data)")

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def _scan_steps(data_dir: str) -> dict[str, list]:
        """Complete step folders of our layout under data_dir, grouped by manifest kind."""
        steps = {"images": [], "latents": [], "features": []}
        for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            manifest = read_manifest(entry.path)
            if manifest is not None and manifest.get("kind") in steps:
                steps[manifest["kind"]].append((entry.path, manifest))
        return steps

    @staticmethod
    def _resolve(data_dir: str, sub: str) -> str:
        path = sub if os.path.isabs(sub) else os.path.join(data_dir, sub)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"folder {path} does not exist")
        return path

    def _find_latents(self, data_dir, steps, override):
        if override is not None:
            path = self._resolve(data_dir, override)
            return path, check_step_complete(path, "latents")
        if len(steps["latents"]) > 1:
            names = ", ".join(os.path.basename(p) for p, _ in steps["latents"])
            raise ValueError(f"several latent folders in {data_dir} ({names}); choose one with latents_dir=")
        if steps["latents"]:
            return steps["latents"][0]
        for name in (OUR_LATENTS_DIR,) + RELEASE_LATENT_DIRS:
            path = os.path.join(data_dir, name)
            if os.path.isdir(path):
                return path, check_step_complete(path, "latents")
        raise FileNotFoundError(f"no latents folder in {data_dir}: expected {OUR_LATENTS_DIR}/ (run "
                                f"preprocessing/dataset_tools.py encode) or the release's vae-sd/")

    def _find_images(self, data_dir, steps, override):
        if override is not None:
            path = self._resolve(data_dir, override)
            manifest = check_step_complete(path, "images")
        elif len(steps["images"]) > 1:
            names = ", ".join(os.path.basename(p) for p, _ in steps["images"])
            raise ValueError(f"several image folders in {data_dir} ({names}); choose one with images_dir=")
        elif steps["images"]:
            path, manifest = steps["images"][0]
        else:
            path = next((os.path.join(data_dir, n) for n in RELEASE_IMAGE_DIRS
                         if os.path.isdir(os.path.join(data_dir, n))), None)
            if path is None:
                raise FileNotFoundError(f"no images folder in {data_dir}: expected {OUR_IMAGES_DIR}/ (run "
                                        f"preprocessing/dataset_tools.py convert) or imagenet_256_vae/")
            manifest = check_step_complete(path, "images")
        if manifest is not None:
            labels = read_labels(path)
            files = sorted(labels) if labels is not None else list_files(path, IMAGE_EXTS)
            if "num_images" in manifest:
                self._counts.append((path, "images", int(manifest["num_images"]), f"its {LABELS} lists", len(files)))
        else:
            files = list_files(path, IMAGE_EXTS)
        return path, files

    def _choose_features(self, steps, use_features, enc_types) -> str:
        if use_features is False:
            return "none"
        by_enc = {}                     # {encoder: {kind: [(path, manifest), ...]}}
        for path, m in steps["features"]:
            by_enc.setdefault(m["encoder"], {}).setdefault(m["feature_kind"], []).append((path, m))
        wanted = list(enc_types) if enc_types is not None else sorted(by_enc)
        if not wanted and enc_types is not None:
            return "none"          # no encoder asked for: nothing to load
        if use_features in ("full", "cls"):
            kinds = ["full"] if use_features == "full" else ["cls", "full"]
        else:
            kinds = None
            if wanted and all("full" in by_enc.get(e, {}) for e in wanted):
                kinds = ["full"]
            elif wanted and all(by_enc.get(e) for e in wanted):
                kinds = ["cls", "full"]
            if kinds is None:
                if use_features is True:
                    missing = [e for e in wanted if not by_enc.get(e)] or wanted
                    raise FileNotFoundError(f"no cached features for {', '.join(missing) or 'any encoder'} in "
                                            f"{self.data_dir}; run preprocessing/dataset_tools.py cache-features")
                return "none"
        for e in wanted:
            have = by_enc.get(e, {})
            kind = next((k for k in kinds if k in have), None)
            if kind is None:
                raise FileNotFoundError(f"no {'/'.join(kinds)} feature cache for {e} in {self.data_dir} "
                                        f"(found: {sorted(have) or 'none'}); run cache-features --kind {kinds[0]}")
            path, m = self._pick_cache(e, have[kind])
            self._features.append((e, path, m))
        if not self._features:
            raise FileNotFoundError(f"no cached features in {self.data_dir}; run cache-features")
        return kinds[0]

    def _pick_cache(self, name: str, candidates: list) -> tuple[str, dict]:
        """The one cache of an encoder's kind to use: its preprocessing must be the registry's, its
        weights this run's (when given); several fitting caches are ambiguous."""
        from models.encoders import weights_differ

        fitting, reasons = [], []
        for path, m in candidates:
            why = _preprocessing_differs(name, m)
            if why is None and name in self._encoder_weights:
                why = weights_differ(m.get("weights"), self._encoder_weights[name])
                why = why and f"other {name} weights than this run's ({why})"
            if why is None:
                fitting.append((path, m))
            else:
                reasons.append(f"{path} was made with {why}")
        if not fitting:
            raise ValueError(f"{'; '.join(reasons)}: rerun cache-features for {name} into a new folder, or remove it")
        if len(fitting) > 1:
            raise ValueError(f"several {fitting[0][1]['feature_kind']} feature caches for {name} in {self.data_dir} "
                             f"({', '.join(os.path.basename(p) for p, _ in fitting)}); keep one")
        return fitting[0]

    # ------------------------------------------------------------------ API
    def has_features(self, enc_types=None, kind: str | None = None) -> bool:
        """Whether this dataset returns cached outputs for every encoder in enc_types."""
        if self.feature_kind == "none":
            return False
        if kind == "full" and self.feature_kind != "full":
            return False
        if enc_types is None:
            return True
        if isinstance(enc_types, str):
            enc_types = [e for e in enc_types.split(",") if e]
        return list(enc_types) == self.enc_types

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> dict:
        if not self.skip_bad:
            return self._item(i)
        # --skip-bad-samples: a damaged item is replaced by the next readable one, the same on every
        # rank and every rerun, so the data stream (and resume) stays deterministic. The item carries
        # the index it replaces ("skipped", -1: none): loader workers are other processes, so the
        # caller reports it (skipped_notes), into its own log.
        for j in range(i, i + len(self)):
            try:
                item = self._item(j % len(self))
            except DataFileError:
                continue
            item["skipped"] = torch.tensor(i if j != i else -1)
            return item
        raise DataFileError(f"every sample of {self.data_dir} is damaged")

    def skipped_notes(self, batches) -> list[str]:
        """One line for each damaged sample that a batch (or list of batches) holds a replacement
        for and that was not reported before; the reason is read again here, in the caller's process."""
        notes = []
        for batch in batches if isinstance(batches, (list, tuple)) else [batches]:
            for i in batch.pop("skipped", torch.empty(0)).tolist():
                if i < 0 or i in self._warned:
                    continue
                self._warned.add(i)
                try:
                    self._item(i)
                    why = "unreadable in a loader worker"
                except DataFileError as e:
                    why = str(e)
                notes.append(f"warning: skipping a damaged sample (index {i}, replaced by the next readable one, "
                             f"--skip-bad-samples): {why}")
        return notes

    def _item(self, i: int) -> dict:
        latent_file = self._latent_files[i].decode("utf-8")
        path = os.path.join(self.latents_dir, latent_file)
        try:
            moments = np.load(path)                                            # (2C, h, w) float32
            if moments.shape != self.moments_shape:
                raise ValueError(f"shape {moments.shape}, expected {self.moments_shape}")
        except (ValueError, OSError, EOFError, MemoryError) as e:
            raise self._unreadable(path, i, "encode", self.latents_dir, e) from None
        self._check_finite(moments, path, i, "encode")
        item = {"moments": torch.from_numpy(moments.astype(np.float32, copy=False)),
                "label": torch.tensor(self.labels[i])}
        if self.load_images:
            name = self._image_files[i].decode("utf-8")
            path = os.path.join(self.images_dir, name)
            try:
                image = read_image(path)                                       # (3, R, R) uint8
            except (ValueError, OSError, SyntaxError, MemoryError) as e:
                raise self._unreadable(path, i, "convert", self.images_dir, e) from None
            if image.shape[-2:] != (self.resolution, self.resolution):
                raise ValueError(f"image {name} is {image.shape[-1]}x{image.shape[-2]}, the dataset is "
                                 f"{self.resolution}x{self.resolution}")
            item["image"] = image
        if self._features:
            cls_list, tok_list = [], []
            for k, (_, folder, m) in enumerate(self._features):
                reader, row = self._readers[k], int(self._feature_rows[k][i])
                full = self.feature_kind == "full"
                try:
                    # (1 + T, Z) for full use; (Z,) the global token of a cls cache, or of a full cache's row
                    entry = reader.row(row, first_only=not full and m["feature_kind"] == "full")
                except (ValueError, OSError, EOFError, IndexError, MemoryError) as e:
                    raise self._unreadable(reader.path(row), i, "cache-features", folder, e) from None
                self._check_finite(entry, reader.path(row), i, "cache-features")
                entry = torch.from_numpy(entry)
                if full:
                    cls_list.append(entry[0].clone())
                    tok_list.append(entry)
                else:
                    cls_list.append(entry)
            item["enc_cls"] = cls_list
            if self.feature_kind == "full":
                item["enc_tokens"] = tok_list
        return item

    @staticmethod
    def _check_finite(a: np.ndarray, path: str, i: int, step: str) -> None:
        """NaN or inf in a sample's inputs: named here (it would poison the whole batch's step)."""
        bad = nonfinite_count(a)
        if bad:
            raise DataFileError(f"{path} holds {bad} non-finite value(s) of {a.size} (sample {i}); it was written by "
                                f"the {step} step (delete it and rerun that step to redo it), or train with "
                                f"--skip-bad-samples")

    def _unreadable(self, path: str, i: int, step: str, folder: str, error: BaseException) -> Exception:
        """A read error as a ResourceLimitError (the machine's limits) or a DataFileError (the file)."""
        return resource_limit_error(path, error) or self._damaged(path, i, step, folder, error)

    @staticmethod
    def _damaged(path: str, i: int, step: str, folder: str, error: BaseException) -> "DataFileError":
        manifest = read_manifest(folder) or {}
        source = (manifest.get("params") or {}).get("source")
        again = (f"python preprocessing/dataset_tools.py {step} --source {source} --dest {folder} ..." if source
                 else f"the {step} step that wrote {folder}")
        # a changed byte keeps the size, which is all a rerun checks: the file must go first
        fix = (f"delete it and rerun {again} with its settings (it redoes missing files)" if isinstance(error, ChecksumError)
               else f"rerun {again} with its settings (it finds and redoes damaged files)")
        text = " ".join(str(error).split()) or type(error).__name__
        return DataFileError(f"{path} is damaged (sample {i}: {text[:160]}); it was written by the {step} step: "
                             f"{fix}, or train with --skip-bad-samples")

    def image_path(self, i: int) -> str | None:
        """The image file of item i (None when images are not loaded)."""
        if self._image_files is None:
            return None
        return os.path.join(self.images_dir, self._image_files[i].decode("utf-8"))

    def key(self, i: int) -> str:
        """The shared name of item i (its image path without extension)."""
        return self._keys[i].decode("utf-8")
