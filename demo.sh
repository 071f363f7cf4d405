#!/usr/bin/env bash
# The whole REG pipeline on a laptop CPU in about seven minutes, with no downloads:
#   scikit-learn's bundled handwritten digits -> preprocessing -> train.py -> generate.py -> evaluation.
# Stand-ins, clearly not the paper's parts: a linear patch codec fitted to the digits ("pca:FILE":
# each 8x8 pixel patch -> its top 4 principal components, so a 64px image becomes a 4x8x8 latent
# exactly like an SD-VAE's) instead of the SD-VAE, a RANDOM-weight tiny ViT ("random-vit-tiny")
# instead of DINOv2, and random Inception weights for the ADM metrics (those numbers only show that
# the evaluator runs). The real paths and flags are used throughout; rerunning resumes or reuses
# what is done.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-demo_out}
STEPS=${STEPS:-600}               # optimizer steps (about 4.5 minutes on 2 cores)
NUM_SAMPLES=${NUM_SAMPLES:-200}   # generated images (class-balanced, 20 per digit)
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
EVAL_IMAGES=${EVAL_IMAGES:-100}   # images per side for the (random-weight) ADM metrics
LOG_EVERY=${LOG_EVERY:-25}
PY=${PYTHON:-python}
DATA=$OUT/data
EXP=$OUT/exps/reg-digits

echo "== 1/6 dataset: scikit-learn digits as class folders (64x64 RGB)"
$PY demo/make_digits.py --out "$OUT/raw" --size 64

echo "== 2/6 preprocessing: convert, fit the stand-in codec, encode, cache encoder features"
$PY preprocessing/dataset_tools.py convert --source "$OUT/raw" --dest "$DATA/images" --resolution 64x64 --transform center-crop
$PY preprocessing/dataset_tools.py fit-pca --source "$DATA/images" --dest "$DATA/pca-f8c4.pt" --factor 8 --channels 4
$PY preprocessing/dataset_tools.py encode --source "$DATA/images" --dest "$DATA/vae-latents" --model-url "pca:$DATA/pca-f8c4.pt"
$PY preprocessing/dataset_tools.py cache-features --source "$DATA/images" --enc-type random-vit-tiny --kind full

echo "== 3/6 training SiT-T/2 + REG for $STEPS steps"
# Demo-sized recipe: a higher learning rate and a short EMA (0.99) because the run is only minutes long.
$PY train.py --model SiT-T/2 --enc-type random-vit-tiny --encoder-depth 2 --projector-dim 256 \
    --data-dir "$DATA" --resolution 64 --output-dir "$OUT/exps" --exp-name reg-digits \
    --batch-size 64 --learning-rate 1e-3 --ema-decay 0.99 --max-train-steps "$STEPS" \
    --checkpointing-steps 200 --keep-last 2 --sampling-steps 200 --sample-num-steps 30 --sample-cfg-scale 2 \
    --log-every "$LOG_EVERY" --mixed-precision no --report-to none --num-workers 1
CKPT=$(ls "$EXP"/checkpoints/*.pt | sort | tail -n 1)

echo "== 4/6 sampling $NUM_SAMPLES digits (SDE, $SAMPLE_STEPS steps, cfg 2 on image and class token)"
$PY generate.py --ckpt "$CKPT" --mode sde --num-steps "$SAMPLE_STEPS" --cfg-scale 2.0 --cls-cfg-scale 2.0 \
    --num-fid-samples "$NUM_SAMPLES" --per-proc-batch-size 100 --class-balanced \
    --sample-dir "$OUT/samples" --name reg-digits
SAMPLES=$OUT/samples/reg-digits.npz

echo "== 5/6 evaluation: digit classifier on the samples; ADM metrics (random Inception weights)"
$PY demo/digit_accuracy.py "$SAMPLES" --out-json "$OUT/digit_accuracy.json" --out-grid "$OUT/samples_by_class.png"
[ -f "$OUT/inception-RANDOM.pth" ] || $PY -c "import sys; sys.path.insert(0, '.'); from evaluations.inception import save_random_weights; save_random_weights('$OUT/inception-RANDOM.pth')"
[ -f "$OUT/ref.npz" ] || $PY evaluations/reference.py "$DATA/images" "$OUT/ref.npz" --num-images "$EVAL_IMAGES" --no-stats
$PY -c "import numpy as np; f = np.load('$SAMPLES'); np.savez('$OUT/samples_eval.npz', arr_0=f['arr_0'][:$EVAL_IMAGES])"
$PY evaluations/evaluator.py "$OUT/ref.npz" "$OUT/samples_eval.npz" --inception-weights "$OUT/inception-RANDOM.pth" \
    --fid-method lowrank --device cpu

echo "== 6/6 loss curve"
$PY demo/plot_loss.py "$EXP/metrics.jsonl" --out "$OUT/loss_curve.png"

echo
echo "checkpoint:        $CKPT"
echo "samples by class:  $OUT/samples_by_class.png   (row k = digit k)"
echo "EMA sample grids:  $EXP/samples/"
echo "digit accuracy:    $OUT/digit_accuracy.json"
echo "ADM metrics:       $OUT/samples_eval.metrics.json   (RANDOM Inception weights: pipeline check only)"
echo "loss curve:        $OUT/loss_curve.png"
