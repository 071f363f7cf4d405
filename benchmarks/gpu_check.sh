#!/usr/bin/env bash
# The first check on a GPU machine: one table (training speed, MFU and memory per precision /
# compile / checkpointing, cached vs online features; sampling eager vs compile; finite losses;
# compiled vs eager agreement; the release's step with --release-dir). About 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh [--release-dir PATH] [--batch-size 32] [--tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
