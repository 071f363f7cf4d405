#!/usr/bin/env bash
# Train SiT + REG with the paper's recipe (edit the variables, or set them in the environment).
#   bash train.sh                                    # one node, NUM_GPUS GPUs
#   NUM_NODES=4 NODE_RANK=$i MAIN_ADDR=host0 bash train.sh    # multi-node: run once per node
# Rerunning the same command resumes from the newest checkpoint of $EXP_NAME.
# Recipes: SiT-B/2 uses ENCODER_DEPTH=4; SiT-L/2 and SiT-XL/2 use 8. Ablations: CLS=0 trains plain
# REPA (no class token); CLS=0 PROJ_COEFF=0 trains plain SiT.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-SiT-XL/2}
ENC_TYPE=${ENC_TYPE:-dinov2-vit-b}
ENCODER_DEPTH=${ENCODER_DEPTH:-8}
PROJ_COEFF=${PROJ_COEFF:-0.5}
CLS=${CLS:-0.03}
DATA_DIR=${DATA_DIR:-data/imagenet256}
OUTPUT_DIR=${OUTPUT_DIR:-exps}
EXP_NAME=${EXP_NAME:-linear-dinov2-b-enc${ENCODER_DEPTH}-$(echo "$MODEL" | tr '/' '-' | tr 'A-Z' 'a-z')}
BATCH_SIZE=${BATCH_SIZE:-256}              # global
MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-4000000}  # the released SiT-XL/2 ran 4M steps (800 epochs)
CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-10000}
MIXED_PRECISION=${MIXED_PRECISION:-fp16}
REPORT_TO=${REPORT_TO:-wandb}              # wandb | tensorboard | none
NUM_WORKERS=${NUM_WORKERS:-8}
EXTRA_ARGS=${EXTRA_ARGS:-}                 # e.g. "--keep-last 5 --compile"

NUM_GPUS=${NUM_GPUS:-8}                    # per node
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}

launch=(accelerate launch --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
        --num_processes $((NUM_GPUS * NUM_NODES)) --mixed_precision "$MIXED_PRECISION")
if [[ $((NUM_GPUS * NUM_NODES)) -gt 1 ]]; then
    launch+=(--multi_gpu)
fi

# shellcheck disable=SC2086
"${launch[@]}" train.py \
    --model "$MODEL" \
    --enc-type "$ENC_TYPE" \
    --encoder-depth "$ENCODER_DEPTH" \
    --proj-coeff "$PROJ_COEFF" \
    --cls "$CLS" \
    --path-type linear \
    --prediction v \
    --weighting uniform \
    --data-dir "$DATA_DIR" \
    --output-dir "$OUTPUT_DIR" \
    --exp-name "$EXP_NAME" \
    --batch-size "$BATCH_SIZE" \
    --max-train-steps "$MAX_TRAIN_STEPS" \
    --checkpointing-steps "$CHECKPOINTING_STEPS" \
    --mixed-precision "$MIXED_PRECISION" \
    --allow-tf32 \
    --report-to "$REPORT_TO" \
    --num-workers "$NUM_WORKERS" \
    $EXTRA_ARGS
