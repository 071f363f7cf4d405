#!/usr/bin/env bash
# Checkpoint -> 50K samples (.npz) -> FID / sFID / IS / precision / recall, with the paper's settings
# (SiT-XL/2 + REG, FID 1.36: SDE, 250 steps, cfg 2.3, class-token cfg 2.3, guidance interval [0, 0.85]).
#
#   bash eval.sh reg-xl2-4m                               # a preset (python presets.py list): its sampler
#                                                         # settings, the newest checkpoint of exps/reg-xl2-4m
#   CKPT=exps/reg-b2/checkpoints/0400000.pt NUM_GPUS=4 bash eval.sh    # or edit the variables below
#
# The full generate.py command is printed before it runs; a flag in EXTRA_ARGS wins over the preset's.
# Sampling is resumable: rerun the same command after an interruption. The samples land in
# $SAMPLE_DIR/$NAME.npz (+ $NAME.json, the settings); the evaluator writes $NAME.metrics.json next to them.
# The REG release's own eval.sh (python -m torch.distributed.launch ... generate.py ... --cls=768, then
# evaluations/evaluator.py --ref_batch ... --save_path ...) also runs as it is: generate.py names its output
# as the release does and the evaluator writes the release's results file.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)

PRESET=${1:-${PRESET:-}}
PYTHON=${PYTHON:-python}

# ---- what to evaluate ----
if [[ -n "$PRESET" && -z "${CKPT:-}" ]]; then
    CKPT=$(ls "exps/$PRESET/checkpoints/"*.pt 2>/dev/null | sort | tail -n 1 || true)
    CKPT=${CKPT:-exps/$PRESET/checkpoints/(none yet)}
fi
CKPT=${CKPT:-exps/linear-dinov2-b-enc8/checkpoints/4000000.pt}
REF_BATCH=${REF_BATCH-$ROOT/evaluations/VIRTUAL_imagenet256_labeled.npz}   # ADM's reference batch; empty = sample only
SAMPLE_DIR=${SAMPLE_DIR:-$(dirname "$(dirname "$CKPT")")/samples}

# ---- hardware ----
NUM_GPUS=${NUM_GPUS:-8}
PER_PROC_BATCH=${PER_PROC_BATCH:-64}

# ---- sampler (paper settings) ----
MODE=${MODE:-sde}
NUM_STEPS=${NUM_STEPS:-250}
CFG_SCALE=${CFG_SCALE:-2.3}
CLS_CFG_SCALE=${CLS_CFG_SCALE:-2.3}
GUIDANCE_LOW=${GUIDANCE_LOW:-0.0}
GUIDANCE_HIGH=${GUIDANCE_HIGH:-0.85}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
SEED=${SEED:-0}

# ---- decoder: empty VAE = the checkpoint's own codec, or sd-vae-ft-ema for SD-VAE latents ----
VAE=${VAE:-}                    # ema | mse
VAE_PATH=${VAE_PATH:-}          # local diffusers AutoencoderKL folder (no network; or export REG_VAE_PATH)
INCEPTION_WEIGHTS=${INCEPTION_WEIGHTS:-}
FD_DINOV2_WEIGHTS=${FD_DINOV2_WEIGHTS:-${REG_FD_DINOV2_WEIGHTS:-}}   # dinov2_vitl14_pretrain.pth: also report FD-DINOv2
EXTRA_ARGS=${EXTRA_ARGS:-}      # e.g. "--class-balanced" or "--seed-scheme release"

preset=()
if [[ -n "$PRESET" ]]; then
    mapfile -t preset < <("$PYTHON" "$ROOT/presets.py" eval "$PRESET")
    [[ ${#preset[@]} -gt 0 ]] || exit 2     # presets.py said why
    NAME=${NAME:-$(basename "$CKPT" .pt)-${PRESET}-seed-${SEED}}
fi
NAME=${NAME:-$(basename "$CKPT" .pt)-${MODE}-${NUM_STEPS}-cfg-${CFG_SCALE}-cls-${CLS_CFG_SCALE}-gi-${GUIDANCE_LOW}-${GUIDANCE_HIGH}-seed-${SEED}}

# ---- checks before hours of sampling ----
if [[ ! -f "$CKPT" ]]; then
    echo "eval.sh: checkpoint not found: $CKPT (set CKPT)" >&2
    exit 1
fi
if [[ -n "$REF_BATCH" && ! -f "$REF_BATCH" ]]; then
    echo "eval.sh: reference batch not found: $REF_BATCH (set REF_BATCH to ADM's VIRTUAL_imagenet256_labeled.npz, or REF_BATCH= to only sample)" >&2
    exit 1
fi

gen_args=(
    --ckpt "$CKPT"
    --sample-dir "$SAMPLE_DIR"
    --name "$NAME"
    --num-fid-samples "$NUM_SAMPLES"
    --per-proc-batch-size "$PER_PROC_BATCH"
    --mode "$MODE"
    --num-steps "$NUM_STEPS"
    --cfg-scale "$CFG_SCALE"
    --cls-cfg-scale "$CLS_CFG_SCALE"
    --guidance-low "$GUIDANCE_LOW"
    --guidance-high "$GUIDANCE_HIGH"
    --seed "$SEED"
)
if [[ -n "$VAE" ]]; then gen_args+=(--vae "$VAE"); fi
if [[ -n "$VAE_PATH" ]]; then gen_args+=(--vae-path "$VAE_PATH"); fi
gen_args+=("${preset[@]}")
read -r -a extra <<< "$EXTRA_ARGS"
gen_args+=("${extra[@]}")

echo "+ $PYTHON -m torch.distributed.run --standalone --nproc_per_node $NUM_GPUS $ROOT/generate.py ${gen_args[*]}" >&2
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_GPUS" "$ROOT/generate.py" "${gen_args[@]}"

if [[ -z "$REF_BATCH" ]]; then
    echo "eval.sh: samples in $SAMPLE_DIR/$NAME.npz (REF_BATCH empty: no evaluation)"
    exit 0
fi
eval_args=("$REF_BATCH" "$SAMPLE_DIR/$NAME.npz")
if [[ -n "$INCEPTION_WEIGHTS" ]]; then eval_args+=(--inception-weights "$INCEPTION_WEIGHTS"); fi
if [[ -n "$FD_DINOV2_WEIGHTS" ]]; then eval_args+=(--fd-dinov2-weights "$FD_DINOV2_WEIGHTS"); fi
"$PYTHON" "$ROOT/evaluations/evaluator.py" "${eval_args[@]}"
