"""kNN accuracy of a frozen MAE encoder: cosine similarity, k = 20 and 200, temperature-weighted votes.
The same code as the linear probe's kNN, without training the probe.

    python scripts/knn.py --model_name_or_path runs/mae --output_dir runs/mae/knn
    python scripts/knn.py --output_dir runs/random/knn          # random-init baseline

Writes knn_results.json. Flags: --help (they are linear_probe.py's).
"""

from linear_probe import main

from mae_hf.cli import run_script

if __name__ == "__main__":
    run_script(main, linear_probe=False)
