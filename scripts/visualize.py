"""Draw reconstructions of a saved MAE: original, masked input, reconstruction, reconstruction + visible patches.

    python scripts/visualize.py runs/mae --output runs/mae/grid.png

The images and masks are fixed evaluation images and masks: the same ones pretrain.py draws with the same data flags
and seed.
Flags: the data flags of pretrain.py (--dataset_name, --eval_split, ...) plus the ones below; --help. By default
the data flags and --seed are the run's own, recorded in its pretraining_summary.json.
"""

import os
import sys
from dataclasses import dataclass

from mae_hf import MAEForPreTraining
from mae_hf.cli import UsageError, flag, parse_args, run_script
from mae_hf.data import BatchTransform, DataArguments, eval_crop_fraction, fixed_noise, load_image_splits
from mae_hf.inputs import check_pretraining_folder, read_json_object
from mae_hf.paths import check_output_folder
from mae_hf.precision import BF16_AUTO_HELP, decide_bf16
from mae_hf.settings import SETTINGS_NAME
from mae_hf.visualize import grid_image, reconstruction_rows


@dataclass
class VisualizeArguments:
    output: str | None = flag(None, "PNG to write (default MODEL_DIR/reconstructions.png).")
    num_images: int = flag(8, "Images (columns) in the grid.")
    seed: int = flag(42, "Seed of the fixed masks (pretrain.py uses its --seed).")
    bf16: bool | None = flag(None, f"bf16 autocast: {BF16_AUTO_HELP}")
    disable_tqdm: bool = flag(False, "No progress bars (decoding), as the other scripts.")

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"--num_images must be at least 1, got {self.num_images}.")
        if self.output is not None and not self.output.lower().endswith(".png"):  # never over a model file
            raise ValueError(f"--output {self.output}: the grid is a PNG; give a path ending in .png.")


def recorded_settings(model_dir: str | None) -> dict:
    """The data flags and seed the run in `model_dir` recorded (pretraining_summary.json, or a checkpoint's
    run_settings.json), so that the grid shows its own evaluation images and masks; {} for a folder with neither."""
    summary_path, settings_path = (os.path.join(model_dir or "", name) for name in (
        "pretraining_summary.json", SETTINGS_NAME))
    if model_dir is not None and os.path.isfile(summary_path):
        summary = read_json_object(summary_path, "the pretraining summary of the run")
        recorded = dict(summary.get("data") or {"dataset_name": summary.get("dataset_name")})
        if recorded.get("eval_crop_fraction") is None and summary.get("eval_crop_fraction"):
            # the crop the run resolved from all its images: the first --num_images alone could give another
            recorded["eval_crop_fraction"] = summary["eval_crop_fraction"]
        if "seed" in summary:
            recorded["seed"] = summary["seed"]
    elif model_dir is not None and os.path.isfile(settings_path):
        settings = read_json_object(settings_path, "the settings of the run")
        recorded = dict(settings.get("data") or {})
        if "seed" in (settings.get("recipe") or {}):
            recorded["seed"] = settings["recipe"]["seed"]
    else:
        return {}
    return {key: value for key, value in recorded.items() if value is not None}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    model_dir = argv.pop(0) if argv and not argv[0].startswith("-") else None
    recorded = recorded_settings(model_dir)
    data_args, args = parse_args((DataArguments, VisualizeArguments), argv, description=__doc__, defaults=recorded)
    if model_dir is None:  # a usage error: exit code 2, as the parser's own
        print("usage: visualize.py MODEL_DIR [--dataset_name ...] [--output PNG]   (--help for all flags)\n"
              "visualize.py: error: MODEL_DIR (a pretraining output folder) is required.", file=sys.stderr)
        sys.exit(2)
    check_pretraining_folder(model_dir)  # before loading: a probe would get a random decoder
    output = args.output or f"{model_dir.rstrip('/')}/reconstructions.png"
    check_output_folder(os.path.dirname(os.path.abspath(output)), option="--output's folder",  # created, if missing
                        give="a PNG path in a folder", writable=False)
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder. Give a PNG file path, e.g. {output.rstrip('/')}/grid.png.")
    model = MAEForPreTraining.from_pretrained(model_dir)
    train, evaluation = load_image_splits(data_args, model.config.image_size, model.config.num_channels,
                                          first=args.num_images, progress=not args.disable_tqdm)
    noise = fixed_noise(len(evaluation), model.config.num_patches, seed=args.seed)
    crop_fraction = eval_crop_fraction(data_args, model.config.image_size, train)
    transform = BatchTransform.for_model(model.config, eval_crop_fraction=crop_fraction)
    pixel_values = transform(*evaluation.read(range(len(evaluation))))
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    bf16, precision = decide_bf16(args.bf16, model.device)
    grid_image(reconstruction_rows(model, pixel_values, noise, bf16=bf16)).save(output)
    print(f"[visualize] {output} ({precision})")


if __name__ == "__main__":
    run_script(main)
