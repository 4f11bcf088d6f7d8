#!/usr/bin/env bash
# Every GPU measurement the project records, in one run (about 10 minutes on one H200):
#   1. mae_hf vs transformers' ViTMAE train step, bf16 + torch.compile, default model, batch 512;
#   2. whole pretraining pipeline vs model-only step (target: >= 90 %, >= 18,000 images/s);
#   3. 3 epochs of the default pretraining recipe on CIFAR-10 from a local parquet folder (DATA, default
#      ../shared/data/cifar10), whose plan line gives the images/s and the time 320 epochs would take.
# Results go to $OUT (or ./gpu_check). The GPU machine lacks `datasets` and `evaluate`: install them first.
set -euo pipefail
OUT=${OUT:-gpu_check}
DATA=${DATA:-../shared/data/cifar10}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python scripts/benchmark.py --batch_size 512 --compile --warmup 5 --steps 20 --rounds 5 \
    --output_json "$OUT/benchmark_model.json" | tee "$OUT/benchmark_model.txt"
python scripts/benchmark.py --suite pipeline --batch_size 512 --compile --warmup 5 --steps 50 --rounds 5 \
    --pipeline_images 50000 --output_json "$OUT/benchmark_pipeline.json" | tee "$OUT/benchmark_pipeline.txt"
python scripts/pretrain.py --dataset_name "$DATA" --output_dir "$OUT/pretrain_3_epochs" --num_train_epochs 3 \
    --eval_steps 0.5 --save_strategy no --disable_tqdm true 2>&1 | grep -v "examples/s" | tee "$OUT/pretrain.txt"
