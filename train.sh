#!/usr/bin/env bash
# Train SiT + REG. Pick a run of the paper by name, or edit the variables (or set them in the environment):
#   bash train.sh reg-xl2-4m                          # a preset: `python presets.py list` shows them
#   DATA_DIR=data/imagenet256 NUM_GPUS=8 bash train.sh reg-b2-400k
#   MODEL=SiT-B/2 ENCODER_DEPTH=4 bash train.sh       # no preset: the variables below
#   NUM_NODES=4 NODE_RANK=$i MAIN_ADDR=host0 bash train.sh reg-xl2-4m    # multi-node: once per node
# The full command is printed before it runs. Rerunning the same command resumes from the newest
# checkpoint of $EXP_NAME. Ablations: EXTRA_ARGS=--no-class-token trains plain REPA; EXTRA_ARGS="--no-class-token
# --no-projectors" plain SiT (CLS=0 / PROJ_COEFF=0 mean what they meant in the release: the class token or the
# projectors stay, their loss weighted 0). With a preset, a recipe variable you set (MODEL ... MIXED_PRECISION)
# wins over the preset's value, e.g. BATCH_SIZE=128 bash train.sh reg-b2-400k; EXTRA_ARGS="..." adds any
# train.py flag (it wins too).
# Preemption: on SIGTERM (a SLURM time limit or preemption), SIGUSR1 (sbatch --signal=USR1@180: three minutes'
# warning to every process of the job) or Ctrl-C, train.py finishes its step, writes a checkpoint and stops;
# this script then exits 3 and a rerun resumes. A job script that requeues itself (see README, Training):
#   #SBATCH --signal=USR1@180 --requeue
#   srun bash -c '... bash train.sh reg-xl2-4m'; [[ $? == 3 ]] && scontrol requeue "$SLURM_JOB_ID"
set -euo pipefail
cd "$(dirname "$0")"

RECIPE_VARS=(MODEL ENC_TYPE ENCODER_DEPTH PROJ_COEFF CLS BATCH_SIZE MAX_TRAIN_STEPS MIXED_PRECISION)
declare -A GIVEN=()                         # recipe variables set by the user (before the defaults below)
for v in "${RECIPE_VARS[@]}"; do
    if [[ -n "${!v+x}" ]]; then GIVEN[$v]=1; fi
done
PRESET=${1:-${PRESET:-}}
PYTHON=${PYTHON:-python}
preset=()
if [[ -n "$PRESET" ]]; then                 # first: a misspelt preset is the first thing to hear about
    mapfile -t preset < <("$PYTHON" presets.py train "$PRESET")
    [[ ${#preset[@]} -gt 0 ]] || exit 2     # presets.py said why
fi
MODEL=${MODEL:-SiT-XL/2}
ENC_TYPE=${ENC_TYPE:-dinov2-vit-b}
ENCODER_DEPTH=${ENCODER_DEPTH:-8}           # SiT-L/XL use 8, SiT-B uses 4
PROJ_COEFF=${PROJ_COEFF:-0.5}
CLS=${CLS:-0.03}
BATCH_SIZE=${BATCH_SIZE:-256}               # global
MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-4000000} # the released SiT-XL/2 ran 4M steps (800 epochs)
MIXED_PRECISION=${MIXED_PRECISION:-fp16}
DATA_DIR=${DATA_DIR:-data/imagenet256}
OUTPUT_DIR=${OUTPUT_DIR:-exps}
EXP_NAME=${EXP_NAME:-${PRESET:-linear-dinov2-b-enc${ENCODER_DEPTH}-$(echo "$MODEL" | tr '/' '-' | tr 'A-Z' 'a-z')}}
CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-10000}
REPORT_TO=${REPORT_TO:-tensorboard}         # tensorboard (works offline) | wandb (needs a login or WANDB_MODE=offline) | none
NUM_WORKERS=${NUM_WORKERS:-8}
EXTRA_ARGS=${EXTRA_ARGS:-}                  # e.g. "--keep-last 5 --compile --fid-every 50000"

if [[ -z "${NUM_GPUS:-}" ]]; then             # per node; default: the GPUs this node has
    NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [[ "$NUM_GPUS" -eq 0 ]]; then
        echo "train.sh: no GPU found: one process on the CPU (set NUM_GPUS to override)" >&2
        NUM_GPUS=1
    fi
fi
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}

launch=(accelerate launch --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
        --num_processes $((NUM_GPUS * NUM_NODES)))
if [[ $((NUM_GPUS * NUM_NODES)) -gt 1 ]]; then
    launch+=(--multi_gpu)
fi

declare -A FLAG=([MODEL]=--model [ENC_TYPE]=--enc-type [ENCODER_DEPTH]=--encoder-depth [PROJ_COEFF]=--proj-coeff
                 [CLS]=--cls [BATCH_SIZE]=--batch-size [MAX_TRAIN_STEPS]=--max-train-steps
                 [MIXED_PRECISION]=--mixed-precision)
if [[ ! -d "$DATA_DIR" ]]; then            # before starting a process per GPU, each of which would say so
    echo "train.sh: DATA_DIR $DATA_DIR does not exist; prepare it with preprocessing/dataset_tools.py" \
         "(README, 'Data preparation') or set DATA_DIR" >&2
    exit 2
fi
args=()
if [[ -n "$PRESET" ]]; then
    args+=("${preset[@]}")
else
    args+=(--path-type linear --prediction v --weighting uniform --allow-tf32)
fi
for v in "${RECIPE_VARS[@]}"; do            # without a preset: all of them; with one: those you set
    if [[ -z "$PRESET" || -n "${GIVEN[$v]:-}" ]]; then args+=("${FLAG[$v]}" "${!v}"); fi
done
args+=(--data-dir "$DATA_DIR" --output-dir "$OUTPUT_DIR" --exp-name "$EXP_NAME"
       --checkpointing-steps "$CHECKPOINTING_STEPS" --report-to "$REPORT_TO" --num-workers "$NUM_WORKERS")
read -r -a extra <<< "$EXTRA_ARGS"
args+=("${extra[@]}")

echo "+ ${launch[*]} train.py ${args[*]}" >&2
# SLURM signals every process of the job step: the launcher must outlive SIGUSR1 (ignored here and in it; the
# training processes set their own handler) and this shell must outlive SIGTERM until the checkpoint is written
# (a trap runs after the launcher ends; the launcher itself forwards SIGTERM and SIGINT to its workers).
trap '' USR1
trap ':' TERM INT
status=0
"${launch[@]}" train.py "${args[@]}" || status=$?
if [[ $status != 0 && -f "$OUTPUT_DIR/$EXP_NAME/preempted.json" ]]; then
    echo "train.sh: preempted (checkpoint written); rerun the same command to resume" >&2
    exit 3
fi
exit $status
