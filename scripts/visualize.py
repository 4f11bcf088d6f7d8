"""Draw reconstructions of a saved MAE: original, masked input, reconstruction, reconstruction + visible patches,
for fixed evaluation images and fixed masks (the same ones pretrain.py draws with the same data flags and seed).

    python scripts/visualize.py runs/mae --dataset_name ../shared/data/cifar10 --output runs/mae/grid.png

Flags: the data flags of pretrain.py (--dataset_name, --eval_split, ...) plus the ones below; --help.
"""

import sys
from dataclasses import dataclass, field

from mae_hf import MAEForPreTraining
from mae_hf.cli import parse_args, run_script
from mae_hf.data import BatchTransform, DataArguments, fixed_noise, load_image_splits
from mae_hf.visualize import save_reconstructions


@dataclass
class VisualizeArguments:
    output: str | None = field(default=None, metadata={"help": "PNG to write (default MODEL_DIR/reconstructions.png)."})
    num_images: int = field(default=8, metadata={"help": "Images (columns) in the grid."})
    seed: int = field(default=42, metadata={"help": "Seed of the fixed masks (pretrain.py uses its --seed)."})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    model_dir = argv.pop(0) if argv and not argv[0].startswith("-") else None
    data_args, args = parse_args((DataArguments, VisualizeArguments), argv, description=__doc__)
    if model_dir is None:
        sys.exit("usage: visualize.py MODEL_DIR [--dataset_name ...] [--output PNG]   (--help for all flags)")
    try:
        model = MAEForPreTraining.from_pretrained(model_dir)
        _, evaluation = load_image_splits(data_args, model.config.image_size, model.config.num_channels)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    noise = fixed_noise(len(evaluation), model.config.num_patches, seed=args.seed)[:args.num_images]
    pixel_values = BatchTransform.for_model(model.config)(evaluation.images[:args.num_images])
    output = args.output or f"{model_dir.rstrip('/')}/reconstructions.png"
    save_reconstructions(model, pixel_values, noise, output)
    print(f"[visualize] {output}")


if __name__ == "__main__":
    run_script(main)
