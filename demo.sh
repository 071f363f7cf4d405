#!/usr/bin/env bash
# The whole REG pipeline on a laptop CPU in about four minutes (2 cores), with no downloads:
#   scikit-learn's bundled handwritten digits -> preprocessing -> train.py -> generate.py -> evaluation.
# demo/pipeline.py runs each stage through the project's own entry points and prints the command
# line of each; stand-ins (a PCA patch codec for the SD-VAE, a random tiny ViT for DINOv2, random
# Inception weights for the ADM numbers) are explained there. Rerunning resumes or reuses what is done.
# Sizes: OUT, STEPS, NUM_SAMPLES, SAMPLE_STEPS, EVAL_IMAGES, LOG_EVERY (environment), or any flag of
# `python demo/pipeline.py --help` after the script name.
set -euo pipefail
cd "$(dirname "$0")"

exec "${PYTHON:-python}" demo/pipeline.py \
    --out "${OUT:-demo_out}" \
    --steps "${STEPS:-600}" \
    --num-samples "${NUM_SAMPLES:-200}" \
    --sample-steps "${SAMPLE_STEPS:-50}" \
    --eval-images "${EVAL_IMAGES:-100}" \
    --log-every "${LOG_EVERY:-25}" \
    "$@"
