#!/usr/bin/env bash
# Every GPU measurement the project records, in one command that ends within 7 minutes on one H100.
#
#   bash scripts/gpu_check.sh              # on the GPU machine, with gpu_carry carried along
#   bash scripts/build_gpu_carry.sh        # before, here: gpu_carry/ (CIFAR-10 parquet + the wheels the GPU lacks)
#   DRY=1 bash scripts/gpu_check.sh        # before, here, on the CPU: every step at tiny sizes (a test runs it)
#
# Sized for a short GPU loan (TOTAL_SECONDS, 420 by default), so that a rerun still fits 15 minutes of device time.
# docs/gpu.md says how to run it with the device tool and what comes back.
#
# Preflight (checks and adapts before anything long): installs the carried wheels the machine lacks or has older
# (--no-index --no-deps, into a folder put on PYTHONPATH); torch, transformers (this project's minimum), datasets,
# evaluate and this checkout's mae_hf must import, and on a GPU run torch must see the GPU: else it stops with
# `error: ...` and exit code 2. It adapts the rest: no C compiler, or a one-line torch.compile that fails, turns
# torch.compile off for every step (said); the ViT-B step's DataLoader workers are lowered to what /dev/shm holds
# (said); a missing or wrong CIFAR-10 parquet skips the three CIFAR-10 steps (said).
#
# Steps, in the order of what they prove, each under its own time cap (`timeout`; what a step leaves of its cap
# goes to the later ones, and no cap reaches past the 7 minutes), a failed or stopped step not stopping the next:
#   pipeline  the default CIFAR-10 pretraining pipeline against the model-only step, bf16 + compile, batch 512:
#             images/s, their ratio, and the host-device syncs counted over 20 steps (set_sync_debug_mode "warn")
#   model     mae_hf against transformers' ViTMAE, one train step, bf16 + compile, batch 512
#   pretrain  a short real pretraining on CIFAR-10 (PRETRAIN_EPOCHS, default 3) ...
#   probe     ... its linear probe + kNN ...
#   finetune  ... and a short fine-tune, strong recipe (FINETUNE_EPOCHS, default 1; eager unless FINETUNE_COMPILE=1:
#             a cold compile of the classifier costs more than its epoch)
#   vit_b     ViT-B/16 at 224 px: the pipeline reading a prepared folder of synthetic JPEGs from disk with workers
# STEPS="pipeline model" runs only those, in the order given (STEPS=preflight: the preflight alone);
# CAP_<STEP>=seconds changes a step's budget (CAP_VIT_B=120), TOTAL_SECONDS the whole run's limit.
#
# What comes back, in $OUT (default ./gpu_check), four files rewritten as each step ends: summary.md (each step's
# status, time, cap and figures), results.json (the same, all figures), log.txt (everything printed) and, at the
# end, results.tar.gz (every result JSON of the runs). The runs themselves stay in $RUNS (./gpu_check_runs).
#
# Dry run (DRY=1 or --dry): the same steps, commands, recipes and files at tiny sizes on the CPU (a model of width
# 16 and depth 4 on 8 px images, 48 training and 16 evaluation images, one epoch, no torch.compile in the steps;
# the preflight's compile test still runs, on the CPU, with SMOKE_BACKEND=aot_eager). SHM_FREE_MB=N rehearses a
# machine with N MB of /dev/shm; DRY_VIT_B_WORKERS=N asks the ViT-B step for N workers (1 by default).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # this header, without running anything
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
DRY=${DRY:-0}
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then
    echo "usage: [DRY=1] bash scripts/gpu_check.sh [--dry]   (settings are environment variables: see --help)" >&2
    exit 2
fi
[ -f scripts/gpu_check.py ] || { echo "error: run this from the repository root." >&2; exit 2; }
OUT=${OUT:-gpu_check}
RUNS=${RUNS:-gpu_check_runs}
CARRY=${CARRY:-gpu_carry}
DATA=${DATA:-$( [ -d "$CARRY/cifar10" ] && echo "$CARRY/cifar10" || echo ../shared/data/cifar10 )}
WHEELS=${WHEELS:-$CARRY/wheels}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-3}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-1}
FINETUNE_COMPILE=${FINETUNE_COMPILE:-0}
VIT_B_WORKERS=${VIT_B_WORKERS:-12}
ALL_STEPS="pipeline model pretrain probe finetune vit_b"
STEPS=${STEPS:-$ALL_STEPS}
if [ "$STEPS" = preflight ]; then STEPS=""; fi  # the preflight alone
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$DRY" = 1 ]; then  # tiny sizes on the CPU; everything else as on the GPU
    TINY="image_size=8,patch_size=2,hidden_size=16,num_hidden_layers=4,num_attention_heads=2,decoder_hidden_size=16"
    TINY="$TINY,decoder_num_hidden_layers=1,decoder_num_attention_heads=2"
    SAMPLES="--max_train_samples 48 --max_eval_samples 16"
    PIPELINE="--device cpu --batch_size 8 --warmup 1 --rounds 1 --steps 2 --pipeline_images 64 --sync_debug_steps 2"
    PIPELINE="$PIPELINE --config_overrides $TINY"
    MODEL="--device cpu --batch_size 8 --warmup 1 --rounds 1 --steps 1 --config_overrides $TINY"
    VIT_B="--device cpu --batch_size 8 --warmup 1 --rounds 1 --steps 2 --pipeline_prepared 64 --config_overrides $TINY"
    VIT_B_BATCH=8 VIT_B_WORKERS=${DRY_VIT_B_WORKERS:-1} PRETRAIN_EPOCHS=1 FINETUNE_EPOCHS=1
    PRETRAIN_SIZES="--config_overrides $TINY --per_device_train_batch_size 16 --per_device_eval_batch_size 16 $SAMPLES"
    PROBE_SIZES="--knn_k 5 --probe_epochs 1 --feature_batch_size 16 $SAMPLES"
    FINETUNE_SIZES="--per_device_train_batch_size 16 --per_device_eval_batch_size 16 $SAMPLES"
    TOTAL_SECONDS=${TOTAL_SECONDS:-1800}
    SMOKE_BACKEND=${SMOKE_BACKEND:-aot_eager}  # inductor's C++ build of the smoke test takes a minute on a CPU
    declare -A BUDGET=([pipeline]=240 [model]=240 [pretrain]=240 [probe]=240 [finetune]=240 [vit_b]=240)
else
    PIPELINE="--batch_size 512 --warmup 5 --rounds 3 --steps 30 --pipeline_images 50000 --sync_debug_steps 20"
    MODEL="--batch_size 512 --warmup 3 --rounds 3 --steps 20"
    VIT_B_BATCH=256
    VIT_B="--batch_size $VIT_B_BATCH --warmup 3 --rounds 2 --steps 15 --pipeline_prepared 8000"
    VIT_B="$VIT_B --config_name configs/models/mae_vit_base_patch16.json"
    PRETRAIN_SIZES="" PROBE_SIZES="" FINETUNE_SIZES=""
    SMOKE_BACKEND=${SMOKE_BACKEND:-inductor}
    TOTAL_SECONDS=${TOTAL_SECONDS:-420}  # 7 minutes: no step's cap reaches past it
    # Estimated H100 times (docs/gpu.md, "Predicted times") with a margin; together with the preflight's ~35 s, 6.5 min
    declare -A BUDGET=([pipeline]=80 [model]=55 [pretrain]=75 [probe]=35 [finetune]=35 [vit_b]=75)
fi
for step in $ALL_STEPS; do  # CAP_<STEP>=seconds overrides a budget (CAP_VIT_B=120)
    override=CAP_${step^^}
    if [ -n "${!override:-}" ]; then BUDGET[$step]=${!override}; fi
done
for step in $STEPS; do
    [ -n "${BUDGET[$step]:-}" ] || { echo "error: STEPS: unknown step $step (steps: $ALL_STEPS)." >&2; exit 2; }
done

mkdir -p "$OUT" "$RUNS"
rm -f "$OUT/summary.md" "$OUT/results.json" "$OUT/log.txt" "$OUT/results.tar.gz" "$RUNS/plan.sh"
exec > >(tee -a "$OUT/log.txt") 2>&1
LOG_WRITER=$!
trap 'exec >&- 2>&-; wait "$LOG_WRITER"' EXIT  # log.txt complete before the command returns, whatever the exit
START=$SECONDS
echo "[gpu_check] $([ "$DRY" = 1 ] && echo "dry run on the CPU, tiny sizes" || echo "GPU run"): $STEPS" \
     "(within $TOTAL_SECONDS s)"

# ---- preflight -------------------------------------------------------------------------------------------------
SITE=$(cd "$RUNS" && pwd)/site  # the carried wheels installed, put first on PYTHONPATH; fresh each run
rm -rf "$SITE"
python3 scripts/gpu_check.py --install "$WHEELS" --site "$SITE" || exit 2
if [ -d "$SITE" ]; then export PYTHONPATH=$SITE:$PYTHONPATH; fi
timeout --kill-after=5 150 python3 scripts/gpu_check.py --preflight --out "$OUT" --runs "$RUNS" --data "$DATA" --site "$SITE" \
    $([ "$DRY" = 1 ] && echo --dry) --vit_b_workers "$VIT_B_WORKERS" --vit_b_batch "$VIT_B_BATCH" \
    --compile_seconds 45 --compile_backend "$SMOKE_BACKEND" \
    ${SHM_FREE_MB:+--shm_free_mb "$SHM_FREE_MB"}
code=$?
if [ "$code" = 124 ] || [ "$code" = 137 ]; then
    echo "error: the preflight took over 150 s (importing the packages or the compile test hung); see above." >&2
fi
[ "$code" = 0 ] || exit 2
. "$RUNS/plan.sh"  # COMPILE, DATA_OK, VIT_B_WORKERS: the preflight's decisions
COMPILE_FLAG=$([ "$COMPILE" = 1 ] && [ "$DRY" != 1 ] && echo --compile)
TRAINER_COMPILE=$([ "$COMPILE" = 1 ] && [ "$DRY" != 1 ] && echo true || echo false)
FINETUNE_TRAINER_COMPILE=$([ "$FINETUNE_COMPILE" = 1 ] && echo "$TRAINER_COMPILE" || echo false)

# ---- the steps: each writes its result files under $RUNS ----------------------------------------------------------
# Each sets STEP_COMMAND, the step's command line (an array).
command_pipeline() {
    STEP_COMMAND=(python3 scripts/benchmark.py --suite pipeline $PIPELINE $COMPILE_FLAG
                  --output_json "$RUNS/benchmark_pipeline.json")
}
command_model() {
    STEP_COMMAND=(python3 scripts/benchmark.py $MODEL $COMPILE_FLAG --output_json "$RUNS/benchmark_model.json")
}
command_pretrain() {
    STEP_COMMAND=(python3 scripts/pretrain.py --output_dir "$RUNS/pretrain" --dataset_name "$DATA"
                  --num_train_epochs "$PRETRAIN_EPOCHS" --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true
                  --torch_compile "$TRAINER_COMPILE" $PRETRAIN_SIZES)
}
command_probe() {
    STEP_COMMAND=(python3 scripts/linear_probe.py --model_name_or_path "$RUNS/pretrain" --output_dir "$RUNS/probe"
                  --dataset_name "$DATA" --disable_tqdm true $PROBE_SIZES)
}
command_finetune() {
    STEP_COMMAND=(python3 scripts/finetune.py configs/finetune_strong.yaml --model_name_or_path "$RUNS/pretrain"
                  --output_dir "$RUNS/finetune" --dataset_name "$DATA" --num_train_epochs "$FINETUNE_EPOCHS"
                  --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true
                  --torch_compile "$FINETUNE_TRAINER_COMPILE" $FINETUNE_SIZES)
}
command_vit_b() {
    STEP_COMMAND=(python3 scripts/benchmark.py --suite pipeline $VIT_B $COMPILE_FLAG --data_workers "$VIT_B_WORKERS"
                  --data_dir "$RUNS/data" --output_json "$RUNS/benchmark_vit_b.json")
}

skip_reason() {  # why a step cannot run, or nothing
    case $1 in
        pretrain) [ "$DATA_OK" = 1 ] || echo "no CIFAR-10 parquet (see the preflight)" ;;
        probe|finetune)
            if [ "$DATA_OK" != 1 ]; then echo "no CIFAR-10 parquet (see the preflight)"
            elif [ ! -f "$RUNS/pretrain/pretraining_summary.json" ]; then echo "no pretrained model (pretrain did not finish)"
            fi ;;
    esac
}

rm -rf "$RUNS/pretrain" "$RUNS/probe" "$RUNS/finetune" "$RUNS"/benchmark_*.json  # each run measures afresh
BANK=0  # seconds earlier steps left of their caps
for step in $STEPS; do
    cap=$((BUDGET[$step] + BANK))
    left=$((TOTAL_SECONDS - (SECONDS - START)))
    if [ "$cap" -gt "$left" ]; then cap=$left; fi
    "command_$step"
    command=${STEP_COMMAND[*]}
    reason=$(skip_reason "$step")
    if [ -z "$reason" ] && [ "$cap" -lt 10 ]; then reason="no time left of the $TOTAL_SECONDS s"; fi
    if [ -n "$reason" ]; then
        echo "[gpu_check] $step: skipped: $reason"
        python3 scripts/gpu_check.py --record "$step" --status "skipped: $reason" --step_command "$command" \
            --out "$OUT" --runs "$RUNS"
        continue
    fi
    echo "[gpu_check] $step (cap $cap s): $command"
    started=$SECONDS
    # TERM at cap - 10 s (the Trainer saves and stops on it), KILL 10 s later: the step never outlasts its cap
    timeout --kill-after=10 $((cap - 10)) "${STEP_COMMAND[@]}"
    code=$?
    used=$((SECONDS - started))
    case $code in
        0) status=ok ;;
        124|137) status="stopped at its cap ($((cap - 10)) s)" ;;
        *) status="failed (exit code $code)" ;;
    esac
    BANK=$((cap - used > 0 ? cap - used : 0))
    python3 scripts/gpu_check.py --record "$step" --status "$status" --seconds "$used" --cap "$cap" \
        --step_command "$command" --out "$OUT" --runs "$RUNS"
done
python3 scripts/gpu_check.py --finish --out "$OUT" --runs "$RUNS"
echo "[gpu_check] done in $((SECONDS - START)) s: $OUT/summary.md"
