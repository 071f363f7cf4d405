"""benchmarks/gpu_check.py at tiny size on the CPU: the table has its rows and columns, the losses of
every precision are finite, and a bad --release-dir is refused in one line."""
import math

import pytest

from benchmarks import gpu_check


@pytest.mark.slow   # ~25 s on the shared 2-core machine (fp16/bf16 autocast on the CPU is slow)
def test_gpu_check_tiny_table(capsys):
    rows = gpu_check.main(["--tiny", "--loss-steps", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert "| " + " | ".join(gpu_check.COLUMNS) + " |" in out
    assert all(tuple(r) == gpu_check.COLUMNS for r in rows)
    train = [r for r in rows if r["check"] == "train"]
    assert {(r["setting"], r["features"]) for r in train} == {("fp16 (release)", "cached"), ("fp16 (release)", "online"),
                                                              ("bf16", "cached")}           # no compile rows on the CPU
    assert all(r["img/s"] > 0 and math.isfinite(float(r["result"].split()[1])) for r in train)
    finite = [r for r in rows if r["check"] == "finite"]
    assert [r["setting"] for r in finite] == ["fp16", "bf16", "fp32"]
    assert all(r["result"].startswith("2/2 finite losses, 0 skipped") for r in finite)
    assert [r["check"] for r in rows if r["check"] in ("sample", "compile", "release")] == ["sample", "compile", "release"]
    assert "skipped" in rows[-1]["result"]                                                  # no release checkout given


def test_gpu_check_refuses_a_release_dir_without_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--release-dir", str(tmp_path)])
    assert "holds no repa_sit.py" in capsys.readouterr().err
