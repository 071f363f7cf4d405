"""evaluations.evaluator / inception / reference on tiny batches with a seeded random-weight Inception.

The network always runs at 299 x 299 (~6 GFLOP per image on a CPU), so the module shares one set of
features and caches reference activations; the whole file runs about 16 images through the network.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from evaluations import evaluator, inception, metrics, reference
from fileio import file_sha256

REPO = Path(__file__).resolve().parent.parent
N = 4  # the minimum for k = 3 nearest neighbours


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return inception.save_random_weights(tmp_path_factory.mktemp("weights") / "random-inception.pth", seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (N, 20, 24, 3), dtype=np.uint8)
    grad = np.linspace(0, 255, 24, dtype=np.float64)[None, None, :, None]
    sample = np.clip(rng.normal(grad, 40, (N, 20, 24, 3)), 0, 255).astype(np.uint8)
    return ref, sample


@pytest.fixture(scope="module")
def files(tmp_path_factory, images, weights):
    """ref_stats.npz built by reference.py (arr_0 + stats + activation cache), ref.npz (arr_0 only,
    cache copied), sample.npz."""
    d = tmp_path_factory.mktemp("batches")
    ref, sample = images
    png_dir = d / "ref_pngs"
    (png_dir / "sub").mkdir(parents=True)
    for i, img in enumerate(ref):  # one image in a subfolder: relative-path order must still hold
        target = png_dir / ("sub" if i == 3 else "") / f"{i}.png"
        PIL.Image.fromarray(img).save(target)
    (png_dir / "dataset.json").write_text("{}")
    ref_stats = reference.build_reference_batch(png_dir, d / "ref_stats.npz", inception_weights=weights, batch_size=3)
    np.savez(d / "ref.npz", arr_0=ref)
    sha = file_sha256(weights)
    evaluator.write_activation_cache(d / "ref.npz", evaluator.read_activation_cache(ref_stats, sha), sha)
    np.savez(d / "sample.npz", arr_0=sample, arr_1=np.arange(N))
    return {"dir": d, "ref": d / "ref.npz", "ref_stats": ref_stats, "sample": d / "sample.npz", "sha": sha}


@pytest.fixture(scope="module")
def sample_feats(weights, images):
    """Features of the sample images in one batch of 4, plus the raw Mixed_6d tensors seen by test hooks."""
    model = inception.InceptionFeatures(weights, "cpu")
    seen = {}
    block = model.net.Mixed_6d
    block.register_forward_hook(lambda m, inp, out: seen.__setitem__("block_in", inp[0].clone()))
    block.branch1x1.register_forward_hook(lambda m, inp, out: seen.__setitem__("branch", out.clone()))
    feats = model(images[1])
    return feats, seen, model


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


def test_features_shapes_and_adm_layout(sample_feats):
    feats, seen, model = sample_feats
    assert feats["pool"].shape == (N, 2048) and feats["spatial"].shape == (N, 2023)
    assert feats["logits"].shape == (N, 1008)
    assert all(v.dtype == np.float32 for v in feats.values())
    branch = seen["branch"].numpy()  # (N, 192, 17, 17)
    # Channels-last flattening of the first 7 channels: index (h * 17 + w) * 7 + c.
    for n, c, h, w in [(0, 0, 0, 0), (1, 6, 3, 11), (3, 2, 16, 16), (2, 5, 9, 0)]:
        assert feats["spatial"][n, (h * 17 + w) * 7 + c] == branch[n, c, h, w]
    assert feats["spatial"].std(axis=0).max() > 0  # input-dependent, not dead ReLUs
    # mixed_6/conv:0 is the ReLU after conv + batchnorm of Mixed_6d's 1x1 branch.
    sd = model.net.state_dict()
    p = "Mixed_6d.branch1x1."
    pre = F.conv2d(seen["block_in"], sd[p + "conv.weight"])
    bn = [sd[p + "bn." + k] for k in ("running_mean", "running_var", "weight", "bias")]
    pre = F.batch_norm(pre, *bn, eps=1e-3)
    np.testing.assert_allclose(torch.relu(pre).numpy(), branch, rtol=1e-5, atol=1e-6)
    # IS logits are pool_3 times the softmax weight, without bias (ADM's softmax/logits/MatMul input).
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ sd["fc.weight"].numpy().T, rtol=1e-4, atol=1e-5)


def test_resize_follows_tf1_align_corners_false():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (1, 1, 7, 5))

    def tf1(src, out):  # TF1 resize_bilinear, align_corners=False, no half-pixel centres
        in_h, in_w = src.shape

        def taps(n_in, n_out):
            pos = np.arange(n_out) * (n_in / n_out)
            lo = np.floor(pos).astype(int)
            return lo, np.minimum(lo + 1, n_in - 1), pos - lo

        y0, y1, fy = taps(in_h, out)
        x0, x1, fx = taps(in_w, out)
        top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
        bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
        return top * (1 - fy[:, None]) + bottom * fy[:, None]

    got = inception.tf1_bilinear_resize(torch.tensor(img, dtype=torch.float32), 299)[0, 0].numpy()
    np.testing.assert_allclose(got, tf1(img[0, 0], 299), atol=1e-3)
    half_pixel = F.interpolate(torch.tensor(img), size=(299, 299), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(half_pixel - got).max() > 1  # PyTorch's default rule is a different image


def test_random_weights_are_seeded_and_match_published_keys(weights):
    saved, again = torch.load(weights), inception.random_state_dict(seed=0)
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)  # same seed, same network
    assert not any(k.endswith("num_batches_tracked") for k in saved)  # same keys as the published file
    assert saved["fc.weight"].shape == (1008, 2048)
    assert not inception.is_published_weights(file_sha256(weights))


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------


def _independent_fid(a, b):
    """Exact FID of two small activation sets via the nuclear norm of A B^T (no sqrtm)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(ca**2) + np.sum(cb**2) - 2 * nuclear


def test_cli_end_to_end(files, sample_feats, weights, capsys):
    feats = sample_feats[0]
    argv = [str(files["ref"]), str(files["sample"]), "--inception-weights", str(weights)]
    result = evaluator.main(argv + ["--batch-size", "3", "--device", "cpu", "--fid-method", "lowrank"])
    lines = capsys.readouterr().out.strip().splitlines()
    names = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    keys = ["inception_score", "fid", "sfid", "precision", "recall"]
    assert [line.split(": ")[0] for line in lines] == names  # ADM's wording and order
    assert [float(line.split(": ")[1]) for line in lines] == [result[k] for k in keys]
    saved = json.loads((files["dir"] / "sample.metrics.json").read_text())
    assert {k: saved[k] for k in keys} == result
    assert saved["num_samples"] == N and saved["published_inception_weights"] is False

    # Independent recomputation from the reference cache and the sample features taken in ONE batch of 4
    # (the CLI used batches of 3 + 1): batch-size invariance and the metric plumbing at once.
    ref = evaluator.read_activation_cache(files["ref"], files["sha"])
    assert ref["pool"].shape == (N, 2048) and ref["spatial"].shape == (N, 2023)
    logits = feats["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_is = np.exp(np.mean(np.sum(p * np.log(p / p.mean(0)), 1)))
    assert result["inception_score"] == pytest.approx(expected_is, rel=1e-4)
    assert result["fid"] == pytest.approx(_independent_fid(feats["pool"], ref["pool"]), rel=1e-3, abs=1e-6)
    assert result["sfid"] == pytest.approx(_independent_fid(feats["spatial"], ref["spatial"]), rel=1e-3, abs=1e-6)
    assert result["sfid"] > 0.1
    assert (result["precision"], result["recall"]) == metrics.precision_recall(ref["pool"], feats["pool"])


def test_evaluate_adm_path_statistics(files, sample_feats, weights, monkeypatch):
    # ADM's sqrtm on 2048 x 2048 takes minutes on a CPU: a spy checks what reaches it instead, and the
    # sample activations come from the fixture (the network itself is covered by the test above).
    feats = sample_feats[0]
    real_compute = evaluator.compute_activations
    monkeypatch.setattr(
        evaluator, "compute_activations",
        lambda model, path, bs, desc: feats if Path(path) == files["sample"] else real_compute(model, path, bs, desc),
    )
    calls = []
    monkeypatch.setattr(metrics, "frechet_distance", lambda *a: calls.append(a) or float(len(calls)))
    ref = evaluator.read_activation_cache(files["ref"], files["sha"])
    with np.load(files["ref_stats"]) as z:
        stored = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}

    # 1) reference with stored mu/sigma/mu_s/sigma_s: ADM uses them as they are.
    result = evaluator.evaluate(files["ref_stats"], files["sample"], inception_weights=weights, device="cpu")
    assert (result["fid"], result["sfid"]) == (1.0, 2.0)
    for (mu1, s1, mu2, s2), kind, suffix in zip(calls, ("pool", "spatial"), ("", "_s")):
        assert mu1.dtype == np.float32 and s1.dtype == np.float64  # ADM's dtypes
        np.testing.assert_array_equal(mu1, feats[kind].mean(0))  # the sample comes first, as in ADM
        np.testing.assert_array_equal(s1, np.cov(feats[kind], rowvar=False))
        np.testing.assert_array_equal(mu2, stored["mu" + suffix])
        np.testing.assert_array_equal(s2, stored["sigma" + suffix])
    # The builder's stored statistics are those of the reference images' activations.
    np.testing.assert_array_equal(stored["mu"], ref["pool"].mean(0))
    np.testing.assert_allclose(stored["sigma_s"], np.cov(ref["spatial"], rowvar=False))

    # 2) reference with images only: statistics from its (cached) activations.
    calls.clear()
    evaluator.evaluate(files["ref"], files["sample"], inception_weights=weights, device="cpu")
    for (_, _, mu2, s2), kind in zip(calls, ("pool", "spatial")):
        np.testing.assert_array_equal(mu2, ref[kind].mean(0))
        np.testing.assert_array_equal(s2, np.cov(ref[kind], rowvar=False))


# ----------------------------------------------------------------------------------------------------
# Reference batch builder and .npz reading
# ----------------------------------------------------------------------------------------------------


def test_reference_builder_writes_adm_format(files, images):
    with np.load(files["ref_stats"]) as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(z["arr_0"], images[0])  # lossless, sorted by relative path
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023)


def test_reference_builder_crop_subset_and_errors(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    wide = np.zeros((300, 600, 3), np.uint8)
    wide[:, 150:450] = (0, 255, 0)  # green middle half: 600x300 -> BOX 150x75 -> BICUBIC 128x64 -> crop [32, 96)
    PIL.Image.fromarray(wide).save(src / "a.png")
    PIL.Image.fromarray(np.full((100, 80, 3), 7, np.uint8)).save(src / "b.jpg")
    out = reference.main([str(src), str(tmp_path / "ref.npz"), "--resolution", "64", "--no-stats"])
    with np.load(out) as z:
        arr = z["arr_0"]
    assert arr.shape == (2, 64, 64, 3) and arr.dtype == np.uint8
    assert (arr[0, :, :, 1] > 200).mean() > 0.9  # the centre crop keeps the green middle
    assert np.abs(arr[1].astype(int) - 7).max() <= 1
    out = reference.build_reference_batch(src, tmp_path / "one.npz", num_images=1, resolution=16, with_stats=False)
    with np.load(out) as z:
        assert z["arr_0"].shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="--resolution"):  # mixed sizes without cropping
        reference.build_reference_batch(src, tmp_path / "bad.npz", with_stats=False)
    with pytest.raises(ValueError, match="between 1 and the 2"):
        reference.build_reference_batch(src, tmp_path / "bad.npz", num_images=3, with_stats=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference.build_reference_batch(tmp_path / "nope", tmp_path / "bad.npz", with_stats=False)
    assert not list(tmp_path.glob("bad.npz*"))  # nothing half-written


def test_streamed_statistics_match_np_cov_and_resume(tmp_path):
    # A stand-in network (pixels -> features) keeps this about the streaming and resume logic.
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):
        PIL.Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(src / f"{i}.png")
    files = reference.list_images(src)

    def fake_model(batch):
        flat = batch.reshape(len(batch), -1).astype(np.float32) / 255  # (B, 90)
        return {"pool": np.tile(flat, 23)[:, :2048], "spatial": np.tile(flat[:, ::-1], 23)[:, :2023]}

    all_feats = fake_model(np.stack([np.asarray(PIL.Image.open(f)) for f in files]))
    progress = tmp_path / "progress.npz"
    calls = []

    def crashing_model(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted after two saved batches
        return fake_model(batch)

    with pytest.raises(KeyboardInterrupt):
        reference.streamed_statistics(crashing_model, files, None, (6, 5, 3), 2, "sha", progress, save_every=1)
    with np.load(progress) as z:
        assert int(z["next"]) == 4
    seen = []
    stats = reference.streamed_statistics(
        lambda b: seen.append(len(b)) or fake_model(b), files, None, (6, 5, 3), 2, "sha", progress, save_every=1
    )
    assert seen == [2, 1]  # only images 4..6 were run again
    for (mu, sigma), kind in zip(stats, ("pool", "spatial")):
        assert mu.dtype == np.float32 and sigma.dtype == np.float64
        np.testing.assert_allclose(mu, all_feats[kind].mean(0), rtol=1e-5)
        np.testing.assert_allclose(sigma, np.cov(all_feats[kind], rowvar=False), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_array_streams_all_rows(tmp_path, save):
    data = np.random.default_rng(2).integers(0, 256, (7, 3, 2, 3), dtype=np.uint8)
    save(tmp_path / "x.npz", arr_0=data, other=np.zeros(2))
    with evaluator.NpzArray(tmp_path / "x.npz", "arr_0") as arr:
        assert arr.shape == data.shape and arr.dtype == np.uint8
        parts = list(arr.batches(3))
    assert [len(b) for b in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), data)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        evaluator.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err  # argparse's one-line error, no traceback
    return err


def test_missing_weights_error_names_file_hash_and_url(files, monkeypatch, capsys):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as exc:
        evaluator.evaluate(files["ref"], files["sample"])
    msg = str(exc.value)
    assert "\n" not in msg
    needles = ("weights-inception-2015-12-05-6726825d.pth", "6726825d", inception.PUBLISHED_WEIGHTS_URL, "REG_INCEPTION_WEIGHTS")
    for needle in needles:
        assert needle in msg
    assert "github.com/toshas/torch-fidelity/releases" in msg
    err = _cli_error(capsys, [str(files["ref"]), str(files["sample"]), "--inception-weights", "/no/such/file.pth"])
    assert "/no/such/file.pth" in err and "6726825d" in err
    monkeypatch.setenv(inception.WEIGHTS_ENV, "/also/missing.pth")
    with pytest.raises(FileNotFoundError, match="REG_INCEPTION_WEIGHTS"):
        inception.resolve_weights_path(None)


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Inception weights"):
        inception.InceptionFeatures(bad)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not torch-fidelity's InceptionV3 weights"):
        inception.InceptionFeatures(tmp_path / "wrong.pth")


@pytest.mark.parametrize(
    "bad, needle",
    [
        (np.zeros((N, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((N, 8, 8), np.uint8), r"\(N, H, W, 3\)"),
        (np.zeros((N, 8, 8, 4), np.uint8), r"\(N, H, W, 3\)"),
        (np.zeros((3, 8, 8, 3), np.uint8), "at least 4"),
    ],
)
def test_bad_sample_batch(files, weights, tmp_path, bad, needle, capsys):
    np.savez(tmp_path / "bad.npz", arr_0=bad)
    with pytest.raises(ValueError, match=needle):
        evaluator.evaluate(files["ref"], tmp_path / "bad.npz", inception_weights=weights)
    _cli_error(capsys, [str(files["ref"]), str(tmp_path / "bad.npz"), "--inception-weights", str(weights)])


def test_reference_without_images_and_other_bad_files(files, weights, tmp_path):
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="no images"):
        evaluator.evaluate(tmp_path / "stats_only.npz", files["sample"], inception_weights=weights)
    with np.load(files["ref"]) as z:
        small = {"mu": np.zeros(10), "sigma": np.eye(10), "mu_s": np.zeros(10), "sigma_s": np.eye(10)}
        np.savez(tmp_path / "bad_stats.npz", arr_0=z["arr_0"], **small)
    with pytest.raises(ValueError, match="mu has shape"):
        evaluator.evaluate(tmp_path / "bad_stats.npz", files["sample"], inception_weights=weights)
    np.save(tmp_path / "plain.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not an .npz"):
        evaluator.evaluate(files["ref"], tmp_path / "plain.npy", inception_weights=weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluator.evaluate(tmp_path / "missing.npz", files["sample"], inception_weights=weights)


def test_cli_argument_errors(files, capsys):
    base = [str(files["ref"]), str(files["sample"])]
    assert "--batch-size" in _cli_error(capsys, base + ["--batch-size", "0"])
    assert "not a torch device" in _cli_error(capsys, base + ["--device", "gpu0"])


@pytest.mark.slow
def test_script_runs_from_repo_root_without_install(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (inception.WEIGHTS_ENV, "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "evaluations/evaluator.py", str(files["ref"]), str(files["sample"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "weights-inception-2015-12-05-6726825d.pth" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# In-process Evaluator and the release's command line
# ----------------------------------------------------------------------------------------------------


def test_evaluator_object_gives_evaluate_numbers_and_accepts_gathered_activations(files, images, weights, monkeypatch):
    """Evaluator.evaluate(in-memory images) == evaluate(the same images as .npz); activations computed in
    parts (as several processes would) and gathered give the same numbers; Inception and the reference
    are loaded once."""
    _, sample = images
    from_file = evaluator.evaluate(files["ref"], files["sample"], inception_weights=weights, batch_size=2,
                                   device="cpu", fid_method="lowrank")
    reads, built = [], []
    real_inception = inception.InceptionFeatures
    monkeypatch.setattr(inception, "InceptionFeatures", lambda *a, **k: built.append(1) or real_inception(*a, **k))
    real_reference = evaluator.reference_activations
    monkeypatch.setattr(evaluator, "reference_activations", lambda *a, **k: reads.append(1) or real_reference(*a, **k))
    ev = evaluator.Evaluator(files["ref"], weights, device="cpu", batch_size=2, fid_method="lowrank")
    assert reads == []                                          # lazy: a process that only computes activations
    computed = []
    real_activations = ev.activations
    ev.activations = lambda imgs: computed.append(real_activations(imgs)) or computed[-1]
    assert ev.evaluate(sample) == from_file
    acts = computed[0]
    assert {k: v.shape for k, v in acts.items()} == {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}
    parts = [{k: v[:1] for k, v in acts.items()}, {k: v[1:] for k, v in acts.items()}, ev.activations(sample[:0])]
    assert parts[2]["pool"].shape == (0, 2048)
    assert ev.metrics_from_activations(parts) == from_file
    assert built == [1]                                         # Inception loaded once
    assert reads == [1]                                         # the reference was read once
    with pytest.raises(ValueError, match="uint8"):
        ev.evaluate(sample.astype(np.float32))
    with pytest.raises(ValueError, match="at least 4"):
        ev.evaluate(sample[:3])
    with pytest.raises(ValueError, match="at least 4"):
        ev.metrics_from_activations([{k: v[:2] for k, v in acts.items()}])
    with pytest.raises(ValueError, match="fid_method"):
        evaluator.Evaluator(files["ref"], weights, fid_method="exact")


def test_release_command_line_writes_the_results_file(files, weights, tmp_path, monkeypatch, capsys):
    """The REG release's flags; the results file is the plain concatenation save_path + num_steps + step
    + cfg + gh + cls_cfg + cfg_cond_{true,false}.txt, with ADM's five lines; $REG_FID_METHOD sets the
    default FID method (the command line of eval.sh is fixed)."""
    fake = {"inception_score": 1.25, "fid": 2.5, "sfid": 3.0, "precision": 0.75, "recall": 0.5}
    seen = {}
    monkeypatch.setattr(evaluator, "evaluate", lambda ref, sample, **k: seen.update(ref=ref, sample=sample, **k) or dict(fake))
    monkeypatch.setenv(evaluator.FID_METHOD_ENV, "lowrank")
    save = tmp_path / "exp" / "checkpoints"
    argv = ["--ref_batch", str(files["ref"]), "--sample_batch", str(files["sample"]), "--save_path", str(save),
            "--cfg_cond", "0", "--step", "0400000", "--num_steps", "3", "--cfg", "1.5", "--cls_cfg", "2", "--gh", "0.9"]
    assert evaluator.main(argv) == fake
    assert seen["ref"] == str(files["ref"]) and seen["sample"] == str(files["sample"])
    assert seen["fid_method"] == "lowrank"
    txt = tmp_path / "exp" / "checkpoints34000001.50.92.0cfg_cond_false.txt"   # step 0400000 -> 400000
    assert save.is_dir()                                                          # created, as the release does
    assert txt.read_text().splitlines() == ["Inception Score: 1.25", "FID: 2.5", "sFID: 3.0", "Precision: 0.75",
                                            "Recall: 0.5"]
    assert capsys.readouterr().out.splitlines() == txt.read_text().splitlines()
    evaluator.main([str(files["ref"]), str(files["sample"]), "--save_path", str(save), "--step", "7", "--fid-method", "adm"])
    assert seen["fid_method"] == "adm"
    assert (tmp_path / "exp" / "checkpoints25071.01.01.0cfg_cond_true.txt").is_file()   # the release's defaults
    assert evaluator.release_results_path("a/b", 250, 4000000, 2.3, 0.85, 2.3, 1) == "a/b25040000002.30.852.3cfg_cond_true.txt"


def test_release_command_line_errors(files, monkeypatch, capsys):
    ref, sample = str(files["ref"]), str(files["sample"])
    assert "given once" in _cli_error(capsys, [ref, sample, "--ref_batch", ref]).replace("give the ref batch once", "given once")
    assert "sample batch" in _cli_error(capsys, ["--ref_batch", ref])
    assert "ref batch" in _cli_error(capsys, [])
    monkeypatch.setenv(evaluator.FID_METHOD_ENV, "exact")
    assert "REG_FID_METHOD='exact'" in _cli_error(capsys, [ref, sample])
