"""The sharded data layout (data_shards.py) on the tiny digits dataset (conftest.digits_data): the same
items and the same batches as the per-file layout on any number of processes (local path and
file:// URL), resumable writers that give the same bytes, direct writing by encode / cache-features,
damaged shards named by sample, bounded open handles, and bitwise training resume."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import data_shards
from data_shards import ShardedDataset, ShardFiles
from data_shards import open_dataset
from dataset import DataFileError
from preprocessing import dataset_tools

from data_order import ResumableSampler

ENC = "random-vit-tiny"
SHARD = 16                              # 100 samples: 6 full shards and one of 4


@pytest.fixture(scope="module")
def packed(digits_data, tmp_path_factory):
    dest = tmp_path_factory.mktemp("shards") / "data"
    dataset_tools.main(["pack", "--source", str(digits_data), "--dest", str(dest), "--shard-size", str(SHARD)])
    return dest


def assert_items_equal(a, b, where=""):
    """The same sample (``skipped``, the --skip-bad-samples bookkeeping of which index was replaced, aside)."""
    a, b = ({k: v for k, v in x.items() if k != "skipped"} for x in (a, b))
    assert list(a) == list(b), where
    for k in a:
        xs, ys = (a[k], b[k]) if isinstance(a[k], list) else ([a[k]], [b[k]])
        assert len(xs) == len(ys), (where, k)
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{where} {k} differs"


@pytest.mark.parametrize("kw", [dict(), dict(use_features="cls", load_images=True), dict(use_features=False)])
def test_every_item_equals_the_per_file_one(digits_data, packed, kw):
    a = open_dataset(str(digits_data), enc_types=[ENC], **kw)
    for where in (str(packed), "file://" + str(packed)):
        b = open_dataset(where, enc_types=[ENC], **kw)
        assert type(b) is ShardedDataset and len(b) == len(a) == 100
        for attr in ("num_classes", "resolution", "moments_shape", "latent_channels", "autoencoder_spec",
                     "latent_scale", "latent_bias", "codec_identity", "feature_kind", "enc_types",
                     "encoder_widths", "load_images"):
            assert getattr(a, attr) == getattr(b, attr), attr
        assert [a.key(i) for i in range(100)] == [b.key(i) for i in range(100)]
        for i in range(len(a)):
            assert_items_equal(a[i], b[i], f"{where} item {i}")


def test_a_non_local_fsspec_filesystem(digits_data, packed):
    """memory:// stands in for a bucket that is not a local file system (range reads through fsspec)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for root, _, files in os.walk(packed):
        for f in files:
            fs.pipe(f"/bucket/{os.path.relpath(os.path.join(root, f), packed)}", open(os.path.join(root, f), "rb").read())
    try:
        b = open_dataset("memory:///bucket", enc_types=[ENC], use_features="cls", load_images=True)
        a = open_dataset(str(digits_data), enc_types=[ENC], use_features="cls", load_images=True)
        for i in (0, 17, 99):
            assert_items_equal(a[i], b[i], f"memory item {i}")
    finally:
        fs.rm("/bucket", recursive=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_same_batches_in_the_same_order_and_after_a_mid_epoch_resume(digits_data, packed, world):
    """The training loader (ResumableSampler) on both layouts, every rank (one with 2 workers), from the
    start and from a mid-epoch micro-batch (what resume does)."""
    def batches(data_dir, rank, start, n):
        ds = open_dataset(str(data_dir), enc_types=[ENC])
        sampler = ResumableSampler(len(ds), 5, rank, world, seed=3, start_microbatch=start)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, drop_last=True,
                                             num_workers=2 if (world, rank) == (2, 0) else 0,
                                             generator=torch.Generator().manual_seed(3))
        it = iter(loader)
        return [next(it) for _ in range(n)]

    per_epoch = 100 // (5 * world)
    for rank in range(world):
        for start in (0, per_epoch - 1):            # the last micro-batch of epoch 0, then into epoch 1
            a, b = batches(digits_data, rank, start, 3), batches("file://" + str(packed), rank, start, 3)
            for x, y in zip(a, b):
                assert_items_equal(x, y, f"world {world} rank {rank} start {start}")


def test_pack_is_resumable_and_gives_the_same_bytes(digits_data, packed, tmp_path, monkeypatch):
    real, calls = data_shards.write_shard, []

    def killed_after_three(folder, k, kind, data, extra=None):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(k)
        real(folder, k, kind, data, extra)

    monkeypatch.setattr(dataset_tools, "write_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        dataset_tools.pack(str(digits_data), str(tmp_path / "d"), shard_size=SHARD)
    assert os.path.isfile(tmp_path / "d/latents/.partial.json")
    assert not os.path.isfile(tmp_path / "d/latents/manifest.json")
    monkeypatch.setattr(dataset_tools, "write_shard", real)
    dataset_tools.pack(str(digits_data), str(tmp_path / "d"), shard_size=SHARD)
    for step in ("latents", "images", f"features-{ENC}-full"):
        names = sorted(os.listdir(packed / step))
        assert names == sorted(os.listdir(tmp_path / "d" / step)), step
        for n in names:
            if n != "manifest.json":
                assert (packed / step / n).read_bytes() == (tmp_path / "d" / step / n).read_bytes(), n
        m = json.loads((packed / step / "manifest.json").read_text())
        assert m["layout"] == "shards" and m["num_shards"] == 7 and [s["samples"] for s in m["shards"]][-1] == 4
    assert dataset_tools.pack(str(digits_data), str(tmp_path / "d"), shard_size=SHARD)["status"] == "complete"
    # another shard size into the same folder is refused with the reason
    with pytest.raises(ValueError, match="shard_size"):
        dataset_tools.pack(str(digits_data), str(tmp_path / "d"), shard_size=8)


@pytest.mark.slow
def test_encode_and_cache_features_write_the_packed_shards(digits_data, packed, tmp_path):
    run = dataset_tools.main
    run(["encode", "--source", str(digits_data / "images"), "--dest", str(tmp_path / "latents"), "--model-url",
         f"pca:{digits_data / 'pca-f8c4.pt'}", "--workers", "0", "--shards", "--shard-size", str(SHARD),
         "--batch-size", "7"])
    run(["cache-features", "--source", str(digits_data / "images"), "--enc-type", ENC, "--kind", "full",
         "--dest", str(tmp_path / f"features-{ENC}-full"), "--workers", "0", "--shards", "--shard-size", str(SHARD),
         "--batch-size", "7"])
    for step in ("latents", f"features-{ENC}-full"):
        for k in range(7):
            name = f"shard-{k:06d}.npy"
            assert (tmp_path / step / name).read_bytes() == (packed / step / name).read_bytes(), (step, name)
    assert (tmp_path / "latents/index-keys.npy").read_bytes() == (packed / "latents/index-keys.npy").read_bytes()
    # latents + a full cache: a run that needs no images
    ds = open_dataset(str(tmp_path), enc_types=[ENC])
    assert ds.feature_kind == "full" and not ds.load_images
    assert_items_equal(ds[37], open_dataset(str(digits_data), enc_types=[ENC], load_images=False)[37])


def test_a_damaged_shard_is_named_with_the_sample_and_can_be_skipped(digits_data, packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    shard = bad / "latents/shard-000002.npy"                       # samples 32..47
    shard.write_bytes(shard.read_bytes()[:-100])                   # cut short: the last two samples
    ds = open_dataset(str(bad), use_features=False, load_images=False)
    with pytest.raises(DataFileError, match=r"shard-000002\.npy is damaged at sample 47 .*--skip-bad-samples"):
        ds[47]
    skip = open_dataset(str(bad), use_features=False, load_images=False, skip_bad=True)
    ref = open_dataset(str(digits_data), use_features=False, load_images=False)
    assert_items_equal(skip[47], ref[48])                          # the next readable sample, as per-file
    assert_items_equal(skip[46], ref[46])
    # a flipped byte in a PNG: decoding fails, named with its sample
    img = bad / "images/shard-000000.bin"
    data = bytearray(img.read_bytes())
    data[0:8] = b"\xff" * 8                                    # sample 0's PNG signature
    img.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match=r"images/shard-000000\.bin is damaged at sample 0"):
        open_dataset(str(bad), use_features=False)[0]
    # verify-shards finds both by checksum; --delete + rerunning pack rewrites them
    with pytest.raises(SystemExit):
        dataset_tools.main(["verify-shards", "--data-dir", str(bad)])
    assert dataset_tools.main(["verify-shards", "--data-dir", str(bad), "--delete"])["damaged"] == 2
    dataset_tools.main(["pack", "--source", str(digits_data), "--dest", str(bad), "--shard-size", str(SHARD)])
    assert shard.read_bytes() == (packed / "latents/shard-000002.npy").read_bytes()
    assert dataset_tools.main(["verify-shards", "--data-dir", str(bad)])["damaged"] == 0


def test_the_release_layout_packs_too(tmp_path):
    """imagenet_256_vae/ + vae-sd/ (no manifests, img-mean-std names): the same items after pack."""
    import PIL.Image

    root = tmp_path / "release"
    os.makedirs(root / "imagenet_256_vae/00000")
    os.makedirs(root / "vae-sd/00000")
    rng = np.random.default_rng(0)
    labels = []
    for i in range(5):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / f"imagenet_256_vae/00000/img{i:08d}.png")
        np.save(root / f"vae-sd/00000/img-mean-std-{i:08d}.npy", rng.standard_normal((8, 4, 4)).astype(np.float32))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 3])
    (root / "vae-sd/dataset.json").write_text(json.dumps({"labels": labels}))
    dataset_tools.pack(str(root), str(tmp_path / "shards"), shard_size=2)
    a, b = open_dataset(str(root)), open_dataset(str(tmp_path / "shards"))
    assert type(b) is ShardedDataset and b.latent_scale == a.latent_scale and b.resolution == a.resolution == 32
    for i in range(5):
        assert_items_equal(a[i], b[i], f"item {i}")


def test_forked_workers_do_not_share_the_parents_handles(digits_data, packed):
    """The main process reads first (handles open), then forked workers read through file://."""
    ds = open_dataset("file://" + str(packed), use_features=False, load_images=True)
    ref = open_dataset(str(digits_data), use_features=False, load_images=True)
    ds[0], ds[50]
    order = [int(i) for i in np.random.default_rng(0).permutation(100)]
    loader = torch.utils.data.DataLoader(ds, batch_size=10, sampler=order, num_workers=2,
                                         multiprocessing_context="fork")
    for b, batch in enumerate(loader):
        for j, i in enumerate(order[10 * b:10 * b + 10]):
            assert torch.equal(batch["image"][j], ref[i]["image"]) and torch.equal(batch["moments"][j], ref[i]["moments"])


def test_open_handles_stay_bounded(packed):
    ds = open_dataset(str(packed), enc_types=[ENC], use_features="cls", load_images=True)
    ds._files = ShardFiles(max_open=2)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for i in np.random.default_rng(0).permutation(len(ds)):
        ds[int(i)]
        assert len(ds._files._handles) <= 2
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds + 2


def test_start_up_reads_the_index_not_a_listing(packed, monkeypatch):
    """Only data_dir's top level is listed (the step folders); no shard folder is listed."""
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": (listed.append(os.fspath(p)), real(p))[1])
    monkeypatch.setattr(os, "listdir", lambda p=".": pytest.fail(f"listed {p}"))
    ds = open_dataset(str(packed), enc_types=[ENC])
    assert len(ds) == 100 and set(listed) == {str(packed)}


def test_bad_sharded_input_is_one_clear_line(digits_data, packed, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(packed, mixed)
    m = json.loads((mixed / "images/manifest.json").read_text())
    m["keys_sha1"] = "0" * 40
    (mixed / "images/manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="other samples or another shard size"):
        open_dataset(str(mixed), use_features=False)
    with pytest.raises(ValueError, match="already sharded"):
        dataset_tools.pack(str(packed), str(tmp_path / "again"))


@pytest.mark.slow
def test_training_on_shards_resumes_bit_for_bit_and_equals_per_file(digits_data, packed, tmp_path, fresh_accelerate):
    """6 steps on per-file data vs 3 + 3 (a resume mid-epoch: 100 samples, batch 8) on file:// shards."""
    import checkpoint
    import train
    from accelerate.state import AcceleratorState, GradientState
    from conftest import train_args

    def run(data, name, steps):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train.main(train_args(data, tmp_path, name, steps, cached_features="no"))

    run(str(digits_data), "files", 6)
    run("file://" + str(packed), "shards", 3)
    run("file://" + str(packed), "shards", 6)
    a = checkpoint.load_checkpoint(str(tmp_path / "files/checkpoints/0000006.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "shards/checkpoints/0000006.pt"))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


@pytest.mark.slow
def test_the_data_benchmark_runs(tmp_path, capsys):
    from benchmarks import bench_data

    bench_data.main(["--num-samples", "32", "--resolution", "32", "--batch-size", "8", "--workers", "0",
                     "--shard-size", "8", "--index-size", "2000", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    for label in ("per-file", "sharded", "sharded file://"):
        assert f"\n{label} " in out, label
    assert "2,000 entries" in out and "SiT-XL/2" in out and "SiT-B/2" in out
    per_file = next(line for line in out.splitlines() if line.startswith("per-file "))
    assert " 2,000.0 " in per_file                      # an image and a latent file opened per sample


@pytest.mark.slow
def test_the_builtin_run_on_shards_trains_the_same_model(tmp_path):
    """demo/pipeline.py --shards packs the digits and trains on the shards: the same checkpoint as per-file."""
    import checkpoint
    from demo import pipeline

    small = ["--steps", "4", "--log-every", "2", "--num-samples", "10", "--sample-steps", "2", "--eval-images", "4",
             "--max-images", "100", "--model", "SiT-XS/2"]
    a = pipeline.main(["--out", str(tmp_path / "files"), *small])
    b = pipeline.main(["--out", str(tmp_path / "shards"), "--shards", *small])
    assert (tmp_path / "shards/data-shards/latents/manifest.json").is_file()
    ca, cb = checkpoint.load_checkpoint(a["checkpoint"]), checkpoint.load_checkpoint(b["checkpoint"])
    for name in ca["ema"]:
        assert torch.equal(ca["ema"][name], cb["ema"][name]), name
