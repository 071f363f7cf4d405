"""preprocessing/dataset_tools.py: convert, encode, cache-features on a tiny image folder.

The ADM centre crop is checked pixel for pixel against a reimplementation written here from
the spec's description; latents against direct AutoencoderKL calls on one image at a time;
features against direct encoder calls. Interruptions are simulated by making the n-th file
write fail, then rerunning the same command.
"""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dataset import REGDataset  # noqa: E402
from models.autoencoder import Autoencoder  # noqa: E402
from models.encoders import load_encoders  # noqa: E402
from preprocessing import dataset_tools as dt  # noqa: E402

RES = 32
# Odd sizes: no halving (67x45), halving twice (130x97 -> 65x48), three times (300x513 -> 37x64),
# exactly 2x (64x64 -> 32x32) and already at size (32x32, must come out unchanged).
SIZES = [(67, 45), (130, 97), (300, 513), (64, 64), (32, 32)]


def _make_raw(root, classes=("n02", "n01", "n03"), corrupt=True):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for j, (w, h) in enumerate(SIZES[:3] if c != "n01" else SIZES):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext, fmt = (".JPEG", "JPEG") if j % 2 == 0 else (".png", "PNG")
            PIL.Image.fromarray(arr).save(root / c / f"im{j}{ext}", format=fmt)
    if corrupt:   # a JPEG cut short after its header
        (root / "n02" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    return root


def _run(args, capsys=None):
    return dt.main([str(a) for a in args])


def _fails(args, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        dt.main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for n in needles:
        assert n in err, err
    return err


def adm_reference_crop(path, size):
    """Spec section 3 written out independently: halve (BOX) while the short side is at least
    twice the target, BICUBIC-resize the short side to the target with rounded sizes, crop."""
    img = PIL.Image.open(path)
    img.load()
    img = img.convert("RGB")
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), PIL.Image.Resampling.BOX)
    s = size / min(w, h)
    w, h = round(w * s), round(h * s)
    img = img.resize((w, h), PIL.Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


#################################################################################
#                                   convert                                     #
#################################################################################

def test_convert_labels_and_pixel_exact_adm_crop(tmp_path, capsys):
    raw = _make_raw(tmp_path / "raw")
    out = tmp_path / "data" / "images"
    summary = _run(["convert", "--source", raw, "--dest", out, "--resolution", f"{RES}x{RES}",
                    "--skip-bad-images", "--workers", "0"])
    sources = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    assert summary["bad"] == ["n02/broken.JPEG"] and summary["written"] == len(sources) - 1

    labels = dict(json.loads((out / "dataset.json").read_text())["labels"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == len(sources) - 1 and manifest["num_bad"] == 1
    assert manifest["num_classes"] == 3 and manifest["class_names"] == ["n01", "n02", "n03"]
    assert not (out / ".partial.json").exists()
    for i, rel in enumerate(sources):
        name = f"00000/img{i:08d}.png"            # index = position in the sorted source listing
        if rel == "n02/broken.JPEG":
            assert name not in labels and not (out / name).exists()
            continue
        assert labels[name] == {"n01": 0, "n02": 1, "n03": 2}[rel.split("/")[0]]
        got = np.array(PIL.Image.open(out / name))
        assert got.shape == (RES, RES, 3)
        np.testing.assert_array_equal(got, adm_reference_crop(raw / rel, RES))
        assert (out / name).stat().st_size >= RES * RES * 3     # stored uncompressed
    # A 32x32 source passes through untouched.
    i = sources.index("n01/im4.JPEG")
    np.testing.assert_array_equal(np.array(PIL.Image.open(out / f"00000/img{i:08d}.png")),
                                  np.array(PIL.Image.open(raw / "n01/im4.JPEG").convert("RGB")))
    # Rerunning a finished step does nothing.
    assert _run(["convert", "--source", raw, "--dest", out, "--resolution", RES, "--skip-bad-images",
                 "--workers", "0"])["status"] == "complete"


def test_plain_center_crop_and_workers_give_same_files(tmp_path):
    raw = _make_raw(tmp_path / "raw", corrupt=False)
    _run(["convert", "--source", raw, "--dest", tmp_path / "a", "--resolution", RES, "--transform", "center-crop",
          "--workers", "2"])
    labels = dict(json.loads((tmp_path / "a" / "dataset.json").read_text())["labels"])
    sources = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    for i, rel in enumerate(sources):
        src = np.array(PIL.Image.open(raw / rel).convert("RGB"))
        h, w = src.shape[:2]
        s = min(h, w)
        sq = src[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        want = np.array(PIL.Image.fromarray(sq).resize((RES, RES), PIL.Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(np.array(PIL.Image.open(tmp_path / "a" / f"00000/img{i:08d}.png")), want)
    assert len(labels) == len(sources)


def test_convert_zip_source_and_zip_dest(tmp_path):
    raw = _make_raw(tmp_path / "raw", corrupt=False)
    zsrc = tmp_path / "raw.zip"
    with zipfile.ZipFile(zsrc, "w") as z:
        for p in sorted(raw.rglob("*")):
            z.write(p, p.relative_to(raw).as_posix())
    _run(["convert", "--source", raw, "--dest", tmp_path / "folder", "--resolution", RES, "--workers", "0"])
    _run(["convert", "--source", zsrc, "--dest", tmp_path / "out.zip", "--resolution", RES, "--workers", "0"])
    assert not (tmp_path / "out.zip.partial").exists()
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        names = z.namelist()
        assert names[-1] == "manifest.json" and all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        for n in names:
            if n.endswith(".png"):
                assert z.read(n) == (tmp_path / "folder" / n).read_bytes()
        assert json.loads(z.read("dataset.json")) == json.loads((tmp_path / "folder" / "dataset.json").read_text())


class _Interrupt(Exception):
    pass


def _fail_after(monkeypatch, n):
    """Make the (n+1)-th file write raise, as if the job were killed there."""
    real = dt.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] > n:
            # Killed mid-write: a temp file is left behind, the target is not.
            left = os.path.join(os.path.dirname(path), f".tmp-otherhost-999-x{calls['n']}.part")
            open(left, "wb").write(data[: len(data) // 2])
            raise _Interrupt(path)
        real(path, data)
    monkeypatch.setattr(dt, "atomic_write_bytes", flaky)
    return calls


def test_convert_resumes_after_interruption(tmp_path, monkeypatch):
    raw = _make_raw(tmp_path / "raw", corrupt=False)
    args = ["convert", "--source", raw, "--dest", tmp_path / "img", "--resolution", RES, "--workers", "0"]
    _fail_after(monkeypatch, 3)
    with pytest.raises(_Interrupt):
        _run(args)
    monkeypatch.undo()
    assert (tmp_path / "img" / ".partial.json").exists() and not (tmp_path / "img" / "manifest.json").exists()
    assert len(list((tmp_path / "img").rglob("*.png"))) == 3
    with pytest.raises(ValueError, match="incomplete"):      # a later step refuses the half-done folder
        REGDataset(str(tmp_path), images_dir="img", latents_dir="img")
    summary = _run(args)
    assert summary["existing"] == 3 and summary["written"] == 8
    assert len([p for p in (tmp_path / "img").rglob(".tmp-*")]) == 0
    _run(["convert", "--source", raw, "--dest", tmp_path / "clean", "--resolution", RES, "--workers", "0"])
    for p in (tmp_path / "clean").rglob("*.png"):
        assert p.read_bytes() == (tmp_path / "img" / p.relative_to(tmp_path / "clean")).read_bytes()


def test_convert_bad_inputs(tmp_path, capsys):
    raw = _make_raw(tmp_path / "raw")
    base = ["--resolution", RES, "--workers", "0"]
    _fails(["convert", "--source", tmp_path / "nope", "--dest", tmp_path / "o1", *base], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    _fails(["convert", "--source", tmp_path / "empty", "--dest", tmp_path / "o2", *base], capsys, "no images found")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o3", *base], capsys,
           "cannot read image", "broken.JPEG", "--skip-bad-images")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "full", *base], capsys, "not empty")
    _fails(["convert", "--source", raw, "--dest", raw / "out", "--skip-bad-images", *base], capsys, "inside")
    # Mixed resolutions are an error when nothing crops them.
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o4", "--transform", "none", "--skip-bad-images",
            *base], capsys, "mixed resolutions")
    # Labels: an image outside any class folder, or missing from a given dataset.json.
    PIL.Image.new("RGB", (40, 40)).save(raw / "stray.png")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o5", "--skip-bad-images", *base], capsys,
           "no label", "stray.png")
    os.remove(raw / "stray.png")
    (raw / "dataset.json").write_text(json.dumps({"labels": [["n01/im0.JPEG", 0]]}))
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o6", "--skip-bad-images", *base], capsys,
           "no label in", "dataset.json")
    # Argument errors.
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o7", "--resolution", "32x16"], capsys, "square")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o7", "--resolution", "big"], capsys, "WxH")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o7", "--resolution", "40"], capsys, "multiple of 16")
    _fails(["convert", "--source", raw, "--dest", tmp_path / "o7", "--resolution", "32", "--max-images", "0"],
           capsys, "positive integer")


def test_convert_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    raw = _make_raw(tmp_path / "raw", corrupt=False)
    _fail_after(monkeypatch, 1)
    with pytest.raises(_Interrupt):
        _run(["convert", "--source", raw, "--dest", tmp_path / "img", "--resolution", RES, "--workers", "0"])
    monkeypatch.undo()
    _fails(["convert", "--source", raw, "--dest", tmp_path / "img", "--resolution", 64, "--workers", "0"],
           capsys, "unfinished step", "resolution")


#################################################################################
#                                    encode                                     #
#################################################################################

@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    raw = _make_raw(root / "raw", corrupt=False)
    dt.main(["convert", "--source", str(raw), "--dest", str(root / "data" / "images"), "--resolution", str(RES),
             "--workers", "0"])
    return root / "data" / "images"


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    Autoencoder.from_spec("random-tiny").vae.save_pretrained(str(path))
    return path


def test_encode_matches_direct_vae_call_and_resumes(images_dir, tiny_vae_dir, tmp_path, monkeypatch):
    dest = tmp_path / "vae-latents"
    args = ["encode", "--source", images_dir, "--dest", dest, "--model-url", tiny_vae_dir,
            "--batch-size", 4, "--workers", 0]
    _fail_after(monkeypatch, 5)
    with pytest.raises(_Interrupt):
        _run(args)
    monkeypatch.undo()
    assert len(list(dest.rglob("*.npy"))) == 5 and not (dest / "manifest.json").exists()
    summary = _run(args)
    assert summary["written"] == 6 and not list(dest.rglob("*.tmp"))

    vae = Autoencoder.from_spec("random-tiny").vae           # the saved weights, used directly
    img_labels = dict(json.loads((images_dir / "dataset.json").read_text())["labels"])
    lat_labels = dict(json.loads((dest / "dataset.json").read_text())["labels"])
    assert len(lat_labels) == len(img_labels) == 11
    for name, label in img_labels.items():
        npy = name[:-4] + ".npy"
        assert lat_labels[npy] == label
        x = torch.from_numpy(np.array(PIL.Image.open(images_dir / name))).permute(2, 0, 1)[None]
        with torch.no_grad():
            d = vae.encode(x.float() / 127.5 - 1).latent_dist
        got = np.load(dest / npy)
        assert got.dtype == np.float32 and got.shape == (8, 4, 4)
        np.testing.assert_allclose(got, torch.cat([d.mean, d.std], 1)[0].numpy(), rtol=1e-4, atol=1e-5)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["autoencoder"] == str(tiny_vae_dir) and manifest["scale"] == pytest.approx(0.18215)
    assert manifest["moments_shape"] == [8, 4, 4] and manifest["num_classes"] == 3 and manifest["resolution"] == RES


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_pca_then_encode_records_the_codec(images_dir, tmp_path, capsys):
    codec = tmp_path / "codecs" / "pca.pt"
    args = ["fit-pca", "--source", images_dir, "--dest", codec, "--factor", 8, "--channels", 3]
    assert _run(args)["status"] == "written"
    assert _run(args)["status"] == "complete"                     # rerun: reused, not refitted
    _fails(["fit-pca", "--source", images_dir, "--dest", codec, "--channels", 4], capsys,
           "exists but was fitted with other settings", "channels")
    _fails(["fit-pca", "--source", images_dir, "--dest", tmp_path / "p2.pt", "--factor", 7], capsys,
           "not divisible by --factor 7")
    dest = tmp_path / "lat"
    _run(["encode", "--source", images_dir, "--dest", dest, "--model-url", f"pca:{codec}", "--workers", 0])
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["autoencoder"] == f"pca:{codec}" and manifest["latent_channels"] == 3
    assert manifest["moments_shape"] == [6, RES // 8, RES // 8]
    ae = Autoencoder.from_spec(manifest["autoencoder"])
    x = torch.from_numpy(np.array(PIL.Image.open(images_dir / "00000/img00000002.png"))).permute(2, 0, 1)[None]
    np.testing.assert_allclose(np.load(dest / "00000/img00000002.npy"), ae.encode_moments(x)[0].numpy(), atol=1e-6)


def test_encode_under_torchrun_env_single_process_gloo(images_dir, tmp_path, monkeypatch):
    import torch.distributed as dist
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    summary = _run(["encode", "--source", images_dir, "--dest", tmp_path / "lat", "--model-url", "identity",
                    "--workers", 0])
    assert (summary["rank"], summary["world"], summary["written"]) == (0, 1, 11)
    assert not dist.is_initialized()                         # the tool cleans up its process group
    x = np.array(PIL.Image.open(images_dir / "00000/img00000002.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(np.load(tmp_path / "lat" / "00000/img00000002.npy"),
                                  np.concatenate([x / np.float32(127.5) - 1, np.zeros_like(x, np.float32)]))


@pytest.mark.slow
def test_encode_two_ranks_split_the_work(images_dir, tmp_path):
    # A real 2-process launch (torchrun, gloo): forking a process that already runs OpenMP threads can hang.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "preprocessing", "dataset_tools.py"), "encode", "--source", str(images_dir),
           "--dest", str(tmp_path / "lat"), "--model-url", "identity", "--workers", "0", "--batch-size", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    done = sorted(re.findall(r"written=(\d+), rank=(\d+), world=2", out.stdout + out.stderr))
    assert sorted((int(r), int(w)) for w, r in done) == [(0, 6), (1, 5)]
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["num_files"] == 11


def test_encode_bad_inputs(images_dir, tmp_path, capsys, monkeypatch):
    base = ["--model-url", "identity", "--workers", "0"]
    _fails(["encode", "--source", tmp_path / "nope", "--dest", tmp_path / "o", *base], capsys, "does not exist")
    # A plain folder of PNGs without labels.
    plain = tmp_path / "plain"
    plain.mkdir()
    PIL.Image.new("RGB", (32, 32)).save(plain / "a.png")
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o", *base], capsys, "no dataset.json")
    # An unfinished convert.
    (plain / ".partial.json").write_text("{}")
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o", *base], capsys, "unfinished")
    os.remove(plain / ".partial.json")
    # Mixed sizes and a corrupt PNG in a release-style folder.
    PIL.Image.new("RGB", (64, 64)).save(plain / "b.png")
    (plain / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["c.png", 0]]}))
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o1", *base], capsys, "mixed resolutions", "b.png")
    os.remove(plain / "b.png")
    (plain / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o2", *base], capsys, "cannot decode", "c.png")
    os.remove(plain / "c.png")
    (plain / "dataset.json").write_text(json.dumps({"labels": [["zz.png", 0]]}))
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o3", *base], capsys, "no label", "a.png")
    PIL.Image.new("RGB", (32, 32)).save(plain / "a.jpg")            # same name, other extension
    (plain / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["a.jpg", 1]]}))
    _fails(["encode", "--source", plain, "--dest", tmp_path / "o3", *base], capsys, "share the name")
    # A VAE that is not there (offline).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _fails(["encode", "--source", images_dir, "--dest", tmp_path / "o4", "--model-url", "someone/missing-vae"],
           capsys, "could not load the VAE", "REG_VAE_PATH")
    _fails(["encode", "--source", images_dir, "--dest", tmp_path / "o5", "--batch-size", "0"], capsys, "positive")


#################################################################################
#                                cache-features                                 #
#################################################################################

@pytest.mark.parametrize("kind", ["cls", "full"])
def test_cache_features_round_trip_and_resume(images_dir, tmp_path, monkeypatch, kind):
    dest = tmp_path / f"features-{kind}"
    args = ["cache-features", "--source", images_dir, "--dest", dest, "--enc-type", "random-vit-tiny",
            "--kind", kind, "--chunk-size", 4, "--batch-size", 3, "--workers", 0]
    _fail_after(monkeypatch, 1)                  # the second chunk write is "killed"
    with pytest.raises(_Interrupt):
        _run(args)
    monkeypatch.undo()
    assert [p.name for p in dest.glob("chunk-*.npy")] == ["chunk-000000.npy"]
    assert _run(args)["written_chunks"] == 2
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["num_chunks"] == 3 and manifest["feature_kind"] == kind and manifest["dtype"] == "float16"
    keys = manifest["keys"]
    assert keys == sorted(keys) and len(keys) == 11
    stored = np.concatenate([np.load(dest / f"chunk-{c:06d}.npy") for c in range(3)])
    assert stored.dtype == np.float16
    # checksums of the chunk written before the kill and of those after it; their own files gone
    assert manifest["checksums"]["rows"] == [zlib.crc32(row.tobytes()) for row in stored]
    assert not list(dest.glob("*.json.*")) and sorted(p.name for p in dest.glob("*.json")) == ["manifest.json"]
    enc = load_encoders("random-vit-tiny", RES)[0]
    x = torch.stack([torch.from_numpy(np.array(PIL.Image.open(images_dir / f"{k}.png"))).permute(2, 0, 1)
                     for k in keys])
    cls, tokens = enc(x)
    want = (cls if kind == "cls" else tokens).half().numpy()
    assert stored.shape == want.shape == ((11, 64) if kind == "cls" else (11, 5, 64))
    np.testing.assert_allclose(stored.astype(np.float32), want.astype(np.float32), atol=2e-3, rtol=2e-3)
    assert np.abs(stored.astype(np.float32)).max() > 0.1            # not an all-zero file


def test_cache_features_bad_inputs(images_dir, tmp_path, capsys):
    _fails(["cache-features", "--source", images_dir, "--enc-type", "clip-vit-Q"], capsys, "choose from")
    _fails(["cache-features", "--source", images_dir, "--enc-type", "random-vit-tiny,dinov2-vit-b"], capsys,
           "one encoder per run")
    _fails(["cache-features", "--source", tmp_path / "nope", "--enc-type", "random-vit-tiny"], capsys,
           "does not exist")
    _fails(["cache-features", "--source", images_dir, "--enc-type", "random-vit-tiny", "--enc-weights", "w.pth",
            "--dest", tmp_path / "f"], capsys, "takes no weights")
