"""Convert a masked autoencoder between transformers' `ViTMAEForPreTraining` and mae_hf's `MAEForPreTraining`.

    python scripts/convert.py runs/mae-cifar10 runs/mae-cifar10-vit-mae
    python scripts/convert.py runs/mae-cifar10-vit-mae runs/back --to mae_hf

SRC_DIR is a `save_pretrained` folder; the direction follows its config.json `model_type` ("vit_mae" -> mae_hf,
"mae_hf" -> ViTMAE). Both models compute the same function. OUT_DIR also gets the image processor (for mae_hf output,
the source's preprocessor_config.json image_mean/image_std are kept).
"""

import argparse
import os
from pathlib import Path

from transformers import ViTMAEForPreTraining

import mae_hf
from mae_hf.cli import run_script
from mae_hf.convert import from_vit_mae, to_vit_mae
from mae_hf.inputs import has_decoder, read_json_object

TARGET = {"vit_mae": "mae_hf", "mae_hf": "vit_mae"}  # source model_type -> target model_type


def source_config(src: Path) -> dict:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{src} has no config.json: not a save_pretrained folder")
    config = read_json_object(str(config_file), "a model config")
    if config.get("model_type") not in TARGET:
        raise ValueError(f"{config_file}: model_type {config.get('model_type')!r} is neither 'vit_mae' nor 'mae_hf'")
    return config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, metavar="SRC_DIR", help="folder written by save_pretrained")
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="output folder (new or empty)")
    parser.add_argument("--to", choices=("vit_mae", "mae_hf", "mae"),
                        help="target model_type (default: the other one; 'mae' is short for 'mae_hf')")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    args.to = "mae_hf" if args.to == "mae" else args.to
    config = source_config(args.src)  # a SRC_DIR that is not a model folder: exit code 1, like a bad file
    model_type, args.architectures = config["model_type"], config.get("architectures") or []
    if (args.to or TARGET[model_type]) != TARGET[model_type]:
        parser.error(f"{args.src} already holds a {model_type} model; nothing to convert with --to {args.to}")
    args.to = TARGET[model_type]
    src, out = args.src.resolve(), args.out.resolve()
    if out == src:
        parser.error("OUT_DIR must differ from SRC_DIR")
    if out in src.parents or src in out.parents:  # --overwrite would write over (or inside) the model it reads
        parser.error(f"OUT_DIR {args.out} overlaps SRC_DIR {args.src} (one contains the other); choose a separate "
                     "folder.")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty (pass --overwrite to write into it)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Only a pretraining model converts: another's converted decoder would be random, its reconstructions noise.
    if not has_decoder(str(args.src), args.architectures, "SRC_DIR"):  # broken weights are named here, before loading
        held = f" ({', '.join(args.architectures)})" if args.architectures else ""
        raise ValueError(f"{args.src} holds no decoder weights{held}: only a pretraining model (encoder + decoder) "
                         "converts. Convert the pretraining run's folder (its decoder is part of the model).")
    if args.to == "vit_mae":
        ours = mae_hf.MAEForPreTraining.from_pretrained(args.src)
        to_vit_mae(ours).save_pretrained(args.out)
        ours.image_processor().save_pretrained(args.out)  # a ViTImageProcessor config
    else:
        ours = from_vit_mae(ViTMAEForPreTraining.from_pretrained(args.src))
        processor_file = str(args.src / "preprocessor_config.json")
        if os.path.isfile(processor_file):  # keep the source's normalisation (e.g. ImageNet statistics)
            processor = read_json_object(processor_file, "an image processor config")
            for key in ("image_mean", "image_std"):
                if key in processor:
                    setattr(ours.config, key, [float(v) for v in processor[key]])
            ours.config.check()
        ours.save_pretrained(args.out)  # weights, config, code files and image processor
    print(f"Saved the {args.to} model to {args.out}")


if __name__ == "__main__":
    run_script(main)
