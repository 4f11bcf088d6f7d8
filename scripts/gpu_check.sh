#!/usr/bin/env bash
# Run every GPU measurement the project records, in one go (sized for about 10 minutes on one H200).
#
#   bash scripts/gpu_check.sh          # on the GPU machine, with gpu_carry/ (below) carried along
#
# What it runs:
#   1. gpu: the GPU's name and memory (nvidia-smi);
#   2. benchmark_model: mae_hf vs transformers' ViTMAE train step, bf16 + torch.compile, default model, batch 512;
#   3. benchmark_pipeline: whole pretraining pipeline vs model-only step (target: >= 90 %, >= 18,000 images/s);
#   4. benchmark_vit_b: the ViT-B/16 MAE (configs/models/mae_vit_base_patch16.json, 224 px, batch 256) model-only
#      step, then the whole pipeline reading a prepared folder of 20,000 synthetic JPEGs from disk with 12 DataLoader
#      workers (targets: >= 90 % of the model-only step, >= 5,000 images/s);
#   5. benchmark_data: the data path alone on this machine's CPUs: images per worker CPU-second from a prepared
#      folder against run_mae.py's per-image transform, and the workers' memory, at 2,000 and 20,000 images;
#   6. reproduce: a short real run of scripts/reproduce.py on CIFAR-10 from a local parquet folder: pretraining
#      (PRETRAIN_EPOCHS, default 5; its plan line gives the images/s and the time 320 epochs would take), linear
#      probe + kNN, multi-block and attentive probes, the strong fine-tune (FINETUNE_EPOCHS, default 2), each for
#      the pretrained and a random-init encoder, then the comparison table of their accuracies and the Hub folder.
# Results go to $OUT (or ./gpu_check), eleven files and one archive: gpu.txt,
# benchmark_{model,pipeline,vit_b,data}.{txt,json}, reproduce.txt (every step's output and time), comparison.md and
# results.tar.gz (the result JSON files); the runs themselves (models, checkpoints, the synthetic prepared folders)
# stay in $RUNS (./gpu_check_runs; remove it for a fresh run: reproduce.py skips the steps it finds done, in one
# folder per PRETRAIN_EPOCHS/FINETUNE_EPOCHS setting, as it refuses to continue a run with other settings).
# SKIP_BENCHMARKS=1 runs steps 1 and 6 alone. Run it from the repository root.
#
# Dry run, on a CPU, before a GPU is lent (a test runs it): `DRY=1 bash scripts/gpu_check.sh` or
# `bash scripts/gpu_check.sh --dry`. The same steps, commands, recipes and output files, at tiny sizes: a model of
# width 16 and depth 4 (reproduce.py's 4-block probe) on 8 px images, 48 training and 16 evaluation images
# (--max_train_samples/--max_eval_samples), one epoch, no torch.compile; nvidia-smi is optional. It catches a typo, a
# renamed flag, a recipe that does not fit or a missing carried file in a minute or two instead of in the GPU's 15.
#
# Before the first long step (both modes) the preflight checks what the run needs and stops with `error: ...` and
# exit code 2 when something is missing: the Python packages (installing the carried wheels if needed), this
# checkout's mae_hf, the CIFAR-10 parquet folder (train.parquet readable, with rows, an image and a label column)
# and, on a GPU run, the GPU (nvidia-smi and torch.cuda).
#
# The GPU machine has torch, transformers, accelerate, einops, safetensors, pyarrow, pillow and matplotlib but not
# `datasets` or `evaluate`, and reaches no network; nor does ../shared (the data) travel with the checkout. Carry
# both in an ignored folder of the checkout, prepared on this machine:
#   echo /gpu_carry/ >> .git/info/exclude
#   mkdir -p gpu_carry/cifar10 && cp ../shared/data/cifar10/train.parquet gpu_carry/cifar10/
#   pip download datasets evaluate -d gpu_carry/wheels       # with the GPU machine's Python version if it differs
#   DRY=1 bash scripts/gpu_check.sh                           # here, with the carried folder: the whole run, tiny
# then run `bash scripts/gpu_check.sh` there with gpu_carry carried (DATA defaults to gpu_carry/cifar10 when present).
#
# Adding a step: write a function `step_<name>` that writes its files into $OUT (using $DRY for its tiny sizes),
# add <name> to STEPS, and check anything it needs that must be carried in `preflight`.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # this header, without running anything
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
DRY=${DRY:-0}
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then
    echo "usage: [DRY=1] bash scripts/gpu_check.sh [--dry]   (settings are environment variables: see the top)" >&2
    exit 2
fi
OUT=${OUT:-gpu_check}
RUNS=${RUNS:-gpu_check_runs}
DATA=${DATA:-$( [ -d gpu_carry/cifar10 ] && echo gpu_carry/cifar10 || echo ../shared/data/cifar10 )}
WHEELS=${WHEELS:-gpu_carry/wheels}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-5}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-2}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ "$DRY" = 1 ]; then  # tiny sizes on the CPU; everything else as on the GPU
    TINY="image_size=8,patch_size=2,hidden_size=16,num_hidden_layers=4,num_attention_heads=2,decoder_hidden_size=16"
    TINY="$TINY,decoder_num_hidden_layers=1,decoder_num_attention_heads=2"
    SAMPLES="--max_train_samples 48 --max_eval_samples 16"
    BENCHMARK="--device cpu --batch_size 8 --warmup 1 --rounds 1 --config_overrides $TINY"
    MODEL_STEPS=1 PIPELINE_STEPS=2 PIPELINE_IMAGES=64
    VIT_B="--device cpu --batch_size 8 --warmup 1 --rounds 1 --steps 2 --config_overrides $TINY"
    PREPARED_IMAGES=64 DATA_WORKERS=1 DATA_SIZES="24 48" DATA_BATCH=8
    PRETRAIN_EPOCHS=1 FINETUNE_EPOCHS=1
    PRETRAIN_SIZES="--config_overrides $TINY --per_device_train_batch_size 16 --per_device_eval_batch_size 16 $SAMPLES"
    PROBE_SIZES="--knn_k 5 --probe_epochs 1 --attentive_epochs 1 --attentive_heads 2 --feature_batch_size 16 $SAMPLES"
    FINETUNE_SIZES="--per_device_train_batch_size 16 --per_device_eval_batch_size 16 $SAMPLES"
else
    BENCHMARK="--batch_size 512 --compile --warmup 5 --rounds 3"
    MODEL_STEPS=20 PIPELINE_STEPS=50 PIPELINE_IMAGES=50000
    VIT_B="--batch_size 256 --compile --warmup 5 --rounds 3 --steps 30"
    PREPARED_IMAGES=20000 DATA_WORKERS=12 DATA_SIZES="2000 20000" DATA_BATCH=256
    PRETRAIN_SIZES="" PROBE_SIZES="" FINETUNE_SIZES=""
fi

fail() {  # a missing prerequisite: before any long step, so no GPU time is spent on a run that cannot finish
    echo "error: $*" >&2
    exit 2
}

# ---- preflight -------------------------------------------------------------------------------------------------

preflight() {
    [ -f scripts/reproduce.py ] || fail "run this script from the repository root (scripts/reproduce.py not found)."
    if ! python -c "import datasets, evaluate" 2>/dev/null; then
        [ -d "$WHEELS" ] || fail "this machine lacks the datasets/evaluate packages and $WHEELS does not exist." \
            "Carry the wheels: pip download datasets evaluate -d $WHEELS (see the top of this script)."
        ls "$WHEELS"/datasets-*.whl "$WHEELS"/evaluate-*.whl >/dev/null 2>&1 \
            || fail "$WHEELS holds no datasets-*.whl and evaluate-*.whl. Carry them: pip download datasets" \
                    "evaluate -d $WHEELS (see the top of this script)."
        pip install -q --no-index --find-links "$WHEELS" datasets evaluate 2>"$OUT/.pip.log" \
            || fail "installing datasets and evaluate from $WHEELS failed (a missing dependency or another Python" \
                    "version?): $(tail -n 3 "$OUT/.pip.log" | tr '\n' ' ')"
        python -c "import datasets, evaluate" 2>"$OUT/.pip.log" \
            || fail "datasets/evaluate from $WHEELS do not import: $(tail -n 1 "$OUT/.pip.log")"
    fi
    if ! python -c "import mae_hf, os, sys; sys.exit(os.path.dirname(mae_hf.__file__) != os.path.abspath('mae_hf'))" \
            2>/dev/null; then  # not this checkout's: install it, or put it on the path
        pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
            || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    python -c "import mae_hf" 2>/dev/null || fail "this checkout's mae_hf does not import: python -c 'import mae_hf'."
    [ -e "$DATA" ] || fail "no CIFAR-10 copy at $DATA. Carry one (see the top of this script) or set DATA."
    python - "$DATA" <<'PYTHON' || exit 2
import sys

import pyarrow.parquet as parquet

folder = sys.argv[1]
try:
    table = parquet.ParquetFile(f"{folder}/train.parquet")
except Exception as error:
    sys.exit(f"error: {folder}/train.parquet does not read as a parquet file ({type(error).__name__}: {error}); "
             "carry the CIFAR-10 training split there (see the top of this script).")
names, rows = table.schema_arrow.names, table.metadata.num_rows
if rows == 0 or not {"img", "image"} & set(names) or "label" not in names:
    sys.exit(f"error: {folder}/train.parquet holds {rows} rows with columns {names}; expected CIFAR-10's training "
             "split (columns img and label).")
print(f"[gpu_check] data: {folder}/train.parquet, {rows:,} images")
PYTHON
    if [ "$DRY" != 1 ]; then
        command -v nvidia-smi >/dev/null || fail "nvidia-smi is missing: no GPU here. Check on a CPU with DRY=1."
        python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
            || fail "torch sees no CUDA GPU (torch.cuda.is_available() is False). Check on a CPU with DRY=1."
    fi
}

# ---- the steps: each writes its files into $OUT ------------------------------------------------------------------

step_gpu() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    else  # a dry run without a GPU
        echo "no GPU: dry run on the CPU ($(nproc) cores)" | tee "$OUT/gpu.txt"
    fi
}

step_benchmark_model() {
    python scripts/benchmark.py $BENCHMARK --steps "$MODEL_STEPS" \
        --output_json "$OUT/benchmark_model.json" | tee "$OUT/benchmark_model.txt"
}

step_benchmark_pipeline() {
    python scripts/benchmark.py --suite pipeline $BENCHMARK --steps "$PIPELINE_STEPS" \
        --pipeline_images "$PIPELINE_IMAGES" --output_json "$OUT/benchmark_pipeline.json" \
        | tee "$OUT/benchmark_pipeline.txt"
}

step_benchmark_vit_b() {  # ViT-B/16 at 224 px: the model-only step, then the whole pipeline reading a prepared folder
    python scripts/benchmark.py --suite pipeline --config_name configs/models/mae_vit_base_patch16.json $VIT_B \
        --pipeline_prepared "$PREPARED_IMAGES" --data_workers "$DATA_WORKERS" --data_dir "$RUNS/data" \
        --output_json "$OUT/benchmark_vit_b.json" | tee "$OUT/benchmark_vit_b.txt"
}

step_benchmark_data() {  # the data path alone, on this machine's CPUs: prepared folder against run_mae.py's way
    python scripts/benchmark.py --suite data --data_sizes $DATA_SIZES --data_workers "$DATA_WORKERS" \
        --batch_size "$DATA_BATCH" --data_dir "$RUNS/data" --output_json "$OUT/benchmark_data.json" \
        | grep -v "^\[" | tee "$OUT/benchmark_data.txt"
}

step_reproduce() {
    # One folder per epoch setting: reproduce.py continues a run with the same settings and refuses other ones.
    local run="$RUNS/reproduce_pretrain${PRETRAIN_EPOCHS}_finetune${FINETUNE_EPOCHS}"
    if [ "$DRY" = 1 ]; then run="${run}_dry"; fi  # a dry run's tiny sizes are other settings
    python scripts/reproduce.py --output_dir "$run" --dataset_name "$DATA" \
        --pretrain_args "--num_train_epochs $PRETRAIN_EPOCHS --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true \
$PRETRAIN_SIZES" \
        --probe_args "--disable_tqdm true $PROBE_SIZES" \
        --finetune_args "--num_train_epochs $FINETUNE_EPOCHS --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true \
$FINETUNE_SIZES" \
        2>&1 | grep -v "examples/s" | tee "$OUT/reproduce.txt"
    cp "$run/comparison.md" "$OUT/comparison.md"
    (cd "$run" && find pretrained random_init -name "*_results.json" -not -path "*checkpoint*" | sort \
        | tar -czf - -T -) > "$OUT/results.tar.gz"
    cat "$OUT/comparison.md"
}

STEPS=(gpu benchmark_model benchmark_pipeline benchmark_vit_b benchmark_data reproduce)
if [ "${SKIP_BENCHMARKS:-0}" = 1 ]; then STEPS=(gpu reproduce); fi

mkdir -p "$OUT"
echo "[gpu_check] $([ "$DRY" = 1 ] && echo "dry run on the CPU, tiny sizes" || echo "GPU run"): ${STEPS[*]}"
preflight
rm -f "$OUT/.pip.log"
for step in "${STEPS[@]}"; do
    started=$SECONDS
    echo "[gpu_check] $step"
    "step_$step"
    echo "[gpu_check] $step: $((SECONDS - started)) s"
done
echo "[gpu_check] done: $OUT"
