"""Data faults a long run meets (issues 25 and 26): each reproduced on the tiny digits dataset and
stopped (or, with --skip-bad-samples, replaced) with its file named -- open-file limits told apart
from damage, listings shorter than their manifests, bit flips in a feature cache, NaN in a latent.

Runnable alone: ``python -m pytest tests/test_data_checks.py`` (``-m slow`` for the subprocess runs
under a lowered ``ulimit -n``).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

import feature_cache
import train
from conftest import ROOT, train_args
from dataset import DataFileError, REGDataset, ResourceLimitError
from feature_cache import chunk_name, file_checksum, nonfinite_count
from preprocessing import dataset_tools
from runtime import raise_open_file_limit

FEATURES = "features-random-vit-tiny-full"


@pytest.fixture
def data(digits_data, tmp_path):
    """A private copy of the 100-digit dataset (latents, full feature cache in chunks of 64): tests damage it."""
    out = tmp_path / "data"
    for name in ("vae-latents", FEATURES):
        shutil.copytree(digits_data / name, out / name)
    return out


@pytest.fixture(scope="module")
def many_chunks(digits_data, tmp_path_factory):
    """The digits with their feature cache rewritten by cache-features in 100 one-image chunks."""
    out = tmp_path_factory.mktemp("chunks") / "data"
    shutil.copytree(digits_data / "vae-latents", out / "vae-latents")
    os.symlink(digits_data / "images", out / "images")
    dataset_tools.main(["cache-features", "--source", str(out / "images"), "--enc-type", "random-vit-tiny",
                        "--kind", "full", "--workers", "0", "--chunk-size", "1", "--dest", str(out / FEATURES)])
    os.remove(out / "images")       # features and latents only: no image is read
    return out


def manifest(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


#################################################################################
#                   Open files: bounded, and never reported as damage            #
#################################################################################

@pytest.fixture
def low_soft_limit():
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts open descriptors through /proc (Linux)")
    """This process's soft ulimit -n lowered to 40 above what is open now (restored after)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, before[1]))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_reading_more_chunks_than_the_open_file_limit(many_chunks, low_soft_limit, monkeypatch, skip_bad):
    ds = REGDataset(str(many_chunks), enc_types=["random-vit-tiny"], skip_bad=skip_bad)
    assert len(ds) == 100 and len(os.listdir(many_chunks / FEATURES)) == 101     # 100 chunks + manifest
    rows = [ds[i]["enc_tokens"][0] for i in range(len(ds))]          # every chunk, bounded maps
    assert len(ds._readers[0]._open) == feature_cache.MAX_OPEN_CHUNKS
    # rows are the cache's values, in the dataset's order
    first = np.load(many_chunks / FEATURES / chunk_name(int(ds._feature_rows[0][7])))[0]
    assert np.array_equal(rows[7].numpy(), first)
    # the old reader (every map kept open) runs out of descriptors: a resource error, never "damaged"
    # and never replaced by skip_bad
    monkeypatch.setattr(feature_cache, "MAX_OPEN_CHUNKS", 10**9)
    ds = REGDataset(str(many_chunks), enc_types=["random-vit-tiny"], skip_bad=skip_bad)
    with pytest.raises(ResourceLimitError) as e:
        for i in range(len(ds)):
            ds[i]
    text = str(e.value)
    assert "too many open files" in text and "ulimit -n" in text and "is damaged" not in text and "\n" not in text


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit to raise the soft one to")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        assert raise_open_file_limit() == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _train_under_ulimit(data, out, name, limit, *prelude, **flags):
    """train.py in a subprocess whose soft and hard ulimit -n are `limit` (so it cannot raise it)."""
    code = "; ".join(["import sys", "sys.argv[0] = 'train.py'", *prelude, "import runpy",
                      "runpy.run_path('train.py', run_name='__main__')"])
    args = train_args(data, out, name, 12, checkpointing_steps=12, **flags)        # 96 of the 100 items
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))


@pytest.mark.slow
def test_a_cache_with_more_chunks_than_ulimit_n_trains(many_chunks, tmp_path):
    limit = 64                              # 100 chunk files: more than the process may open
    ok = _train_under_ulimit(many_chunks, tmp_path, "bounded", limit, num_workers=1)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert os.path.isfile(tmp_path / "bounded/checkpoints/0000012.pt")
    # the same run with the old reader, every map kept open, stops: named as a resource limit (never as
    # damage), even under --skip-bad-samples. Read in the training process: in a loader worker the old
    # reader's first casualty may be torch's descriptor passing of the batch (an EOFError, not ours)
    old = ("import feature_cache", "feature_cache.MAX_OPEN_CHUNKS = 10**9")
    bad = _train_under_ulimit(many_chunks, tmp_path, "old", limit, *old, skip_bad_samples=None)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and last.startswith("error: cannot read ") and "too many open files" in last
    assert "resource limit" in last and "is damaged" not in bad.stderr and "Traceback" not in bad.stderr


#################################################################################
#                       A listing shorter than its manifest                      #
#################################################################################

def _drop_labels(folder, n):
    path = os.path.join(folder, "dataset.json")
    with open(path) as f:
        labels = json.load(f)
    labels["labels"] = labels["labels"][n:]
    with open(path, "w") as f:
        json.dump(labels, f)


def test_entries_removed_from_dataset_json_stop_the_run_with_both_counts(data, tmp_path, caplog):
    _drop_labels(data / "vae-latents", 20)
    with pytest.raises(ValueError) as e:
        REGDataset(str(data), enc_types=["random-vit-tiny"])
    text = str(e.value)
    assert "records 100 latent files but its dataset.json lists 80" in text and "--allow-partial-data" in text
    assert "records 100 cached images but the training set has 80" in text
    with pytest.raises(SystemExit):                                    # train.py: a one-line usage error
        train.main(train_args(data, tmp_path, "stop", 1))
    assert not os.path.exists(tmp_path / "stop" / "checkpoints")
    ds = REGDataset(str(data), enc_types=["random-vit-tiny"], allow_partial=True)
    assert len(ds) == 80 and any("training on 80 items" in n for n in ds.notes)


#################################################################################
#                         A bit flipped in a feature chunk                      #
#################################################################################

def _flip_bit(path, offset_from_end):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))


def test_the_cache_manifest_holds_a_checksum_per_chunk_file_and_per_row(data):
    folder = data / FEATURES
    m = manifest(folder)
    sums = m["checksums"]
    assert sums["algorithm"] == "crc32" and len(sums["chunks"]) == m["num_chunks"] == 2
    assert len(sums["rows"]) == m["num_images"] == 100
    for c in range(m["num_chunks"]):
        block = np.load(folder / chunk_name(c))
        assert file_checksum(folder / chunk_name(c)) == sums["chunks"][c]
        assert [zlib.crc32(r.tobytes()) for r in block] == sums["rows"][c * 64:(c + 1) * 64]
    assert sorted(os.listdir(folder)) == ["chunk-000000.npy", "chunk-000001.npy", "manifest.json"]


def test_a_flipped_bit_in_a_feature_chunk_is_named_before_use(data, tmp_path):
    chunk = data / FEATURES / "chunk-000001.npy"          # rows 64..99; the last row belongs to the last key
    _flip_bit(chunk, 10)
    ds = REGDataset(str(data), enc_types=["random-vit-tiny"])
    victim = int(np.flatnonzero(ds._feature_rows[0] == 99)[0])
    assert ds[victim - 1 if victim else victim + 1]                   # the other rows of the chunk still read
    with pytest.raises(DataFileError) as e:
        ds[victim]
    text = str(e.value)
    assert str(chunk) in text and f"sample {victim}" in text and "crc32" in text and "delete it" in text
    for k in range(36):                                               # every row of the chunk: read at step 1
        _flip_bit(chunk, 10 + k * 5 * 64 * 2)                           # rows of (1 + 4) x 64 float16
    with pytest.raises(DataFileError) as e:                           # a run stops at the step that reads it
        train.main(train_args(data, tmp_path, "flip", 3))
    assert str(chunk) in str(e.value) and "(while reading the data of step 1)" in str(e.value)
    assert not os.path.exists(tmp_path / "flip" / "checkpoints" / "0000001.pt")


def test_verify_finds_a_flipped_chunk_and_a_rerun_redoes_it(data, digits_data):
    folder, chunk = data / FEATURES, data / FEATURES / "chunk-000000.npy"
    good = chunk.read_bytes()
    assert dataset_tools.main(["verify", str(folder)])["status"] == "verified"
    _flip_bit(chunk, 1000)
    summary = dataset_tools.main(["verify", str(folder)])
    assert summary["status"] == "resume" and summary["damaged"] == 1 and not chunk.exists()
    assert not (folder / "manifest.json").exists()                   # reopened: no longer certified complete
    source = json.loads((folder / ".partial.json").read_text())["params"]["source"]
    dataset_tools.main(["cache-features", "--source", source, "--enc-type", "random-vit-tiny",
                        "--kind", "full", "--workers", "0", "--dest", str(folder)])
    assert chunk.read_bytes() == good and manifest(folder)["checksums"] == manifest(digits_data / FEATURES)["checksums"]
    assert dataset_tools.main(["verify", str(folder)])["status"] == "verified"


def test_a_cache_without_checksums_still_reads_with_a_note(data):
    m = manifest(data / FEATURES)
    del m["checksums"]
    with open(data / FEATURES / "manifest.json", "w") as f:
        json.dump(m, f)
    ds = REGDataset(str(data), enc_types=["random-vit-tiny"])
    assert ds[0]["enc_tokens"][0].shape == (5, 64) and any("no checksums" in n for n in ds.notes)


#################################################################################
#                       Non-finite inputs, named by file                       #
#################################################################################

def test_nonfinite_count_matches_numpy_for_float16_and_float32():
    a = np.array([0, 1, -2, 65504, -65504, np.inf, -np.inf, np.nan, 6e-8], dtype=np.float16)
    assert nonfinite_count(a) == 3 == int((~np.isfinite(a)).sum())
    assert nonfinite_count(a.astype(np.float32)) == 3 and nonfinite_count(np.ones(5, np.float16)) == 0


def _poison_latent(data, index=3):
    path = data / "vae-latents" / "00000" / f"img{index:08d}.npy"
    moments = np.load(path)
    moments[0, 1, 2] = np.nan
    np.save(path, moments)
    return path


def test_a_nan_in_a_latent_file_is_named_with_its_sample(data, tmp_path):
    path = _poison_latent(data)
    ds = REGDataset(str(data), enc_types=["random-vit-tiny"])
    with pytest.raises(DataFileError) as e:
        ds[3]
    assert str(path) in str(e.value) and "sample 3" in str(e.value) and "non-finite" in str(e.value)
    poisoned = [str(_poison_latent(data, i)) for i in range(0, 80, 2)]   # 40 of 100: the first batch holds one
    with pytest.raises(DataFileError) as e:                             # --nonfinite stop: the file, not the lr
        train.main(train_args(data, tmp_path, "nan", 3, nonfinite="stop"))
    text = str(e.value)
    assert "(while reading the data of step 1)" in text and "precision" not in text
    assert any(f"{p} holds" in text for p in poisoned)


def test_skip_bad_samples_reports_each_replacement_once_in_the_callers_process(data):
    import torch
    _poison_latent(data)
    ds = REGDataset(str(data), enc_types=["random-vit-tiny"], skip_bad=True)
    batches = [torch.utils.data.default_collate([ds[i] for i in idx]) for idx in ([0, 3, 5], [3, 4])]
    assert torch.equal(batches[0]["skipped"], torch.tensor([-1, 3, -1]))
    assert torch.equal(batches[0]["moments"][1], ds[4]["moments"])        # replaced by the next readable one
    notes = ds.skipped_notes(batches)
    assert len(notes) == 1 and "index 3" in notes[0] and "non-finite" in notes[0]
    assert "skipped" not in batches[1] and ds.skipped_notes([batches[0]]) == []


@pytest.mark.slow
def test_skip_bad_samples_warnings_from_loader_workers_reach_log_txt(data, tmp_path):
    path = _poison_latent(data)
    train.main(train_args(data, tmp_path, "skip", 13, skip_bad_samples=None, num_workers=1, checkpointing_steps=13))
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert log.count("skipping a damaged sample") == 1 and f"{path} holds 1 non-finite" in log and "index 3" in log
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        assert all(not json.loads(line).get("skipped_steps") for line in f)   # no step lost to the NaN
