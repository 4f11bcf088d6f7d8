"""Speed and memory benchmarks: mae_hf against transformers' ViTMAE, the pipeline, the probe, the augmentation.

    python scripts/benchmark.py --device cpu --warmup 2 --steps 2 --rounds 12
    python scripts/benchmark.py --suite pipeline --batch_size 512

The code and the description of every suite live in mae_hf/benchmark.py. Flags: --help.
"""

from mae_hf.benchmark import main
from mae_hf.cli import run_script

if __name__ == "__main__":
    run_script(main)
