"""Assemble a Hub-ready folder from a pretraining run and its evaluation runs, with a model card filled from the
measured result files; optionally push it to the Hub.

    python scripts/publish.py runs/mae --probe runs/mae/probe --finetune runs/mae/finetune \
        --results runs/random --output_dir runs/hub [--push_to_hub --hub_model_id user/mae-cifar10]

--results adds result files or folders (e.g. the random-init baselines) to the card's table.
"""

import argparse
import os
import sys

from mae_hf.publish import assemble, push

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "model_card.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained_dir", help="Output folder of scripts/pretrain.py.")
    parser.add_argument("--probe", help="Output folder of scripts/linear_probe.py on that model.")
    parser.add_argument("--finetune", help="Output folder of scripts/finetune.py on that model.")
    parser.add_argument("--results", nargs="*", default=[], help="More result files/folders (e.g. baselines).")
    parser.add_argument("--output_dir", required=True, help="The folder to assemble.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output_dir.")
    parser.add_argument("--template", default=TEMPLATE, help="Model card template (default: model_card.md).")
    parser.add_argument("--dataset_id", default="uoft-cs/cifar10", help="Hub dataset id for the card metadata.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to the Hub.")
    parser.add_argument("--hub_model_id", help="Hub repository, e.g. user/mae-cifar10 (needed to push).")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. user/mae-cifar10).")
    try:
        card = assemble(args.pretrained_dir, args.output_dir, args.probe, args.finetune, args.results,
                        template_path=args.template, model_id=args.hub_model_id, dataset_id=args.dataset_id,
                        overwrite=args.overwrite)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"[publish] {args.output_dir} is complete (model card: {card})")
    if args.push_to_hub:
        try:
            print(f"[publish] pushed: {push(args.output_dir, args.hub_model_id, args.private)}")
        except RuntimeError as error:
            sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
