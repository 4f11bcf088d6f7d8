#!/usr/bin/env bash
# Run every GPU measurement the project records, in one go (sized for about 10 minutes on one H200).
#
#   bash scripts/gpu_check.sh          # on the GPU machine, with gpu_carry/ (below) carried along
#
# What it runs:
#   1. mae_hf vs transformers' ViTMAE train step, bf16 + torch.compile, default model, batch 512;
#   2. whole pretraining pipeline vs model-only step (target: >= 90 %, >= 18,000 images/s);
#   3. a short real run of scripts/reproduce.py on CIFAR-10 from a local parquet folder: pretraining
#      (PRETRAIN_EPOCHS, default 5; its plan line gives the images/s and the time 320 epochs would take), linear
#      probe + kNN, multi-block and attentive probes, the strong fine-tune (FINETUNE_EPOCHS, default 2), each for
#      the pretrained and a random-init encoder, then the comparison table of their accuracies and the Hub folder.
# Results go to $OUT (or ./gpu_check), seven files and one archive: the printed tables and JSON records,
# reproduce.txt (every step's output and time), comparison.md and results.tar.gz (the result JSON files); the runs
# themselves (models, checkpoints) stay in $RUNS (./gpu_check_runs). SKIP_BENCHMARKS=1 runs step 3 alone.
#
# The GPU machine has torch, transformers, accelerate, einops, safetensors, pyarrow, pillow and matplotlib but not
# `datasets` or `evaluate`, and reaches no network; nor does ../shared (the data) travel with the checkout. Carry
# both in an ignored folder of the checkout, prepared on this machine:
#   echo /gpu_carry/ >> .git/info/exclude
#   mkdir -p gpu_carry/cifar10 && cp ../shared/data/cifar10/train.parquet gpu_carry/cifar10/
#   pip download datasets evaluate -d gpu_carry/wheels       # with the GPU machine's Python version if it differs
# then run `bash scripts/gpu_check.sh` there with gpu_carry carried (DATA defaults to gpu_carry/cifar10 when present).
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then  # this header, without running anything
    sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
OUT=${OUT:-gpu_check}
RUNS=${RUNS:-gpu_check_runs}
DATA=${DATA:-$( [ -d gpu_carry/cifar10 ] && echo gpu_carry/cifar10 || echo ../shared/data/cifar10 )}
WHEELS=${WHEELS:-gpu_carry/wheels}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-5}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-2}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! python -c "import datasets, evaluate" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
        pip install -q --no-index --find-links "$WHEELS" datasets evaluate
    else
        echo "error: this machine lacks the datasets/evaluate packages and $WHEELS holds no wheels for them. Carry" \
             "them: pip download datasets evaluate -d $WHEELS (see the top of this script)." >&2
        exit 2
    fi
fi
if [ ! -e "$DATA" ]; then
    echo "error: no CIFAR-10 copy at $DATA. Carry one (see the top of this script) or set DATA." >&2
    exit 2
fi
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_BENCHMARKS:-0}" != 1 ]; then
    python scripts/benchmark.py --batch_size 512 --compile --warmup 5 --steps 20 --rounds 3 \
        --output_json "$OUT/benchmark_model.json" | tee "$OUT/benchmark_model.txt"
    python scripts/benchmark.py --suite pipeline --batch_size 512 --compile --warmup 5 --steps 50 --rounds 3 \
        --pipeline_images 50000 --output_json "$OUT/benchmark_pipeline.json" | tee "$OUT/benchmark_pipeline.txt"
fi
python scripts/reproduce.py --output_dir "$RUNS/reproduce" --dataset_name "$DATA" \
    --pretrain_args "--num_train_epochs $PRETRAIN_EPOCHS --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true" \
    --probe_args "--disable_tqdm true" \
    --finetune_args "--num_train_epochs $FINETUNE_EPOCHS --eval_steps 0.5 --save_steps 0.5 --disable_tqdm true" \
    2>&1 | grep -v "examples/s" | tee "$OUT/reproduce.txt"
cp "$RUNS/reproduce/comparison.md" "$OUT/comparison.md"
(cd "$RUNS/reproduce" && find pretrained random_init -name "*_results.json" -not -path "*checkpoint*" | sort \
    | tar -czf - -T -) > "$OUT/results.tar.gz"
cat "$OUT/comparison.md"
