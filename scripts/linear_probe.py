"""Linear probe and kNN accuracy of a frozen MAE encoder (also the multi-block linear and attentive probes).

    python scripts/linear_probe.py --model_name_or_path runs/mae --output_dir runs/mae/probe
    python scripts/linear_probe.py --model_name_or_path runs/mae --random_init true --output_dir runs/random/probe
    python scripts/linear_probe.py --output_dir runs/random/probe          # no model: random-init baseline

As in the MAE paper: features once, then BatchNorm without affine parameters + linear head trained on the cached
features. The encoder is never trained and never re-run per epoch.

Writes linear_probe_results.json and knn_results.json (k = 20 and 200; --knn false to skip), and saves the probe
as an MAEForImageClassification in --output_dir (pipeline("image-classification") loads it). Flags: --help.

Probes that suit MAE (mae_hf/probes.py), from the same single pass of the encoder:

    python scripts/linear_probe.py --model_name_or_path runs/mae --feature_blocks 4 --output_dir runs/mae/multiblock
    python scripts/linear_probe.py --model_name_or_path runs/mae --attentive_probe true --linear_probe false \\
        --knn false --output_dir runs/mae/attentive

--feature_blocks k > 1 makes the linear probe a multi-block one (linear_probe_multiblock_results.json);
--attentive_probe true adds the attentive probe (attentive_probe_results.json). Their heads are saved as
<protocol>_head.safetensors + <protocol>_head.json (mae_hf.probes.load_head reloads them).
"""

from mae_hf.cli import parse_args, run_script
from mae_hf.data import DataArguments
from mae_hf.evaluation import FrozenEvalArguments, run_frozen_evaluation
from mae_hf.loading import ModelArguments


def main(argv=None, description=__doc__, **defaults):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, FrozenEvalArguments), argv,
                                             description=description)
    vars(args).update(defaults)
    run_frozen_evaluation(model_args, data_args, args)


if __name__ == "__main__":
    run_script(main)
