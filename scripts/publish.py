r"""Assemble a Hub-ready folder, its model card filled from measured results; optionally add the demo and push it.

    python scripts/publish.py runs/mae --probe runs/mae/probe --finetune runs/mae/finetune --results runs/random \
        --output_dir runs/hub
    python scripts/publish.py runs/mae --probe runs/mae/probe --finetune runs/mae/finetune --results runs/random \
        --output_dir runs/hub --overwrite true --space true --push_to_hub true --hub_model_id user/mae-cifar10

The folder holds the pretraining run's model with its linear-probe head, the fine-tuned classifier, the pictures and
the result files; --space true adds the Gradio demo (a Space) and --push_to_hub true uploads it. --results adds
result files or folders (e.g. the random-init baselines) to the card's table. Boolean flags take true/false (a bare
flag means true), as in the other scripts. Pushing needs `hf auth login`, HF_TOKEN or --hub_token;
it is checked before anything is assembled.
"""

import argparse
import os

from transformers.hf_argparser import string_to_bool

from mae_hf.cli import run_script
from mae_hf.publish import assemble, hub_preflight, push

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TEMPLATE = os.path.join(ROOT, "model_card.md")
DEMO = os.path.join(ROOT, "demo")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s PRETRAINED_DIR --output_dir DIR [--flag value ...]   (--help "
                                           "lists every flag)")

    def boolean(name, help):
        parser.add_argument(name, type=string_to_bool, nargs="?", const=True, default=False, help=help)

    parser.add_argument("pretrained_dir", help="Output folder of scripts/pretrain.py.")
    parser.add_argument("--probe", help="Output folder of scripts/linear_probe.py on that model.")
    parser.add_argument("--finetune", help="Output folder of scripts/finetune.py on that model.")
    parser.add_argument("--results", nargs="*", default=[], help="More result files/folders (e.g. baselines).")
    parser.add_argument("--output_dir", required=True, help="The folder to assemble.")
    boolean("--overwrite", "Replace a non-empty --output_dir.")
    parser.add_argument("--template", default=TEMPLATE, help="Model card template (default: model_card.md).")
    parser.add_argument("--dataset_id", help="Hub dataset the card names when the run read a local copy of it "
                                             "(default: none, the card describes the local folder); a run on a Hub "
                                             "dataset names its own.")
    parser.add_argument("--dataset_source", help="Where local data without --dataset_id came from, stated on the "
                                                 "card with the folder's name (e.g. 'a JPEG copy of CIFAR-10').")
    boolean("--space", "Add the Gradio demo (app.py, requirements.txt, examples/) and Space metadata.")
    boolean("--push_to_hub", "Upload the folder to the Hub.")
    parser.add_argument("--hub_model_id", help="Hub repository, e.g. user/mae-cifar10 (needed to push).")
    boolean("--hub_private_repo", "Create the Hub repository as private (an existing one keeps its visibility).")
    parser.add_argument("--hub_token", help="Hub token (default: HF_TOKEN, else the one `hf auth login` stored).")
    parser.add_argument("--hub_revision", help="Branch to push to (created from main if missing).")
    boolean("--create_pr", "Open a pull request (against --hub_revision or main) instead of committing.")
    parser.add_argument("--commit_message", help="Commit message (default: 'Upload <folder name>').")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. user/mae-cifar10).")
    if args.dataset_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.dataset_id)
        except HFValidationError:
            parser.error(f"--dataset_id {args.dataset_id!r} is not a Hub dataset id (name or owner/name, e.g. "
                         "uoft-cs/cifar10).")
    if args.push_to_hub:
        hub_preflight(args.hub_model_id, args.hub_token)
    card = assemble(args.pretrained_dir, args.output_dir, args.probe, args.finetune, args.results,
                    template_path=args.template, model_id=args.hub_model_id, dataset_id=args.dataset_id,
                    overwrite=args.overwrite, space_dir=DEMO if args.space else None,
                    dataset_source=args.dataset_source)
    print(f"[publish] {args.output_dir} is complete (model card: {card})")
    if args.push_to_hub:
        url = push(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                   commit_message=args.commit_message, revision=args.hub_revision, create_pr=args.create_pr)
        print(f"[publish] pushed: {url}")


if __name__ == "__main__":
    run_script(main)
