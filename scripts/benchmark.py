"""Benchmarks (the code lives in mae_hf/benchmark.py): mae_hf against transformers' ViTMAE, the whole pretraining
pipeline against the model step, the probe on cached features, the fine-tuning augmentation. Flags: --help.

    python scripts/benchmark.py --device cpu --warmup 2 --steps 2 --rounds 12
    python scripts/benchmark.py --suite pipeline --batch_size 512
"""

from mae_hf.benchmark import main
from mae_hf.cli import run_script

if __name__ == "__main__":
    run_script(main)
