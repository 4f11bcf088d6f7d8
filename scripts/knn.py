"""kNN accuracy of a frozen MAE encoder: cosine similarity, k = 20 and 200, temperature-weighted votes.

    python scripts/knn.py --model_name_or_path runs/mae --output_dir runs/mae/knn
    python scripts/knn.py --output_dir runs/random/knn          # random-init baseline

The same code as the linear probe's kNN, without training the probe. Writes knn_results.json. The flags are
linear_probe.py's (--help lists them).
"""

import linear_probe

from mae_hf.cli import run_script


def main(argv=None, **defaults):
    linear_probe.main(argv, description=__doc__, **{"linear_probe": False, **defaults})


if __name__ == "__main__":
    run_script(main)
