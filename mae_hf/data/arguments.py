"""The data flags every script shares: where the images come from (`SourceArguments`, also what
scripts/prepare_data.py converts), which splits and how many images (`DataArguments`), and how they are held."""

import math
import os
from dataclasses import dataclass, fields

from ..cli import flag

IMAGE_COLUMN_NAMES = ("img", "image", "pixel_values", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
DEFAULT_DATASET = "uoft-cs/cifar10"
IMAGEFOLDER_NAMES = ("imagefolder", "nateraw/image-folder")  # what transformers' examples pass with --train_dir
IN_MEMORY_CHOICES = ("auto", "true", "false")


@dataclass
class SourceArguments:
    """Where the images come from: a Hub dataset, a local dataset folder or file, image folders or a prepared folder."""

    dataset_name: str | None = flag(
        None, f"Hub dataset id (default {DEFAULT_DATASET}), or a local folder (parquet files such as "
        "train.parquet/test.parquet, an imagefolder tree, a `save_to_disk` folder, or a folder made by "
        "scripts/prepare_data.py), or a single .parquet file. Not with --train_dir.")
    dataset_config_name: str | None = flag(None, "Hub dataset configuration name.")
    dataset_revision: str | None = flag(
        None, "A Hub dataset's revision (branch, tag or commit). Unset: the latest commit, which the run records, so "
        "that a resume reads the same data.")
    train_dir: str | None = flag(
        None, "A folder of training images, one subfolder per class (train_dir/cat/1.png, ...); instead of "
        "--dataset_name, as in transformers' example scripts. Listed in one directory pass.")
    validation_dir: str | None = flag(
        None, "A folder of evaluation images laid out like --train_dir (needs --train_dir).")
    image_column_name: str | None = flag(
        None, f"Image column; found by type or by name {IMAGE_COLUMN_NAMES} when unset.")
    label_column_name: str | None = flag(
        None, f"Label column; found by type or by name {LABEL_COLUMN_NAMES} when unset.")
    cache_dir: str | None = flag(None, "Where `datasets` caches downloads.")
    skip_bad_images: bool = flag(
        False, "Leave out images that cannot be decoded (corrupt or empty files) instead of stopping; they are "
        "counted, printed and listed in the result files.")

    def __post_init__(self):
        expand = os.path.expanduser  # "~" from a config file, where no shell expands it
        self.train_dir = self.train_dir and expand(self.train_dir)
        self.validation_dir = self.validation_dir and expand(self.validation_dir)
        if self.validation_dir and not self.train_dir:
            raise ValueError("--validation_dir needs --train_dir: every script also reads a training split.")
        if self.train_dir:
            if self.dataset_name not in (None, self.train_dir, *IMAGEFOLDER_NAMES):
                raise ValueError(f"--dataset_name {self.dataset_name} and --train_dir {self.train_dir} both name the "
                                 "data; give one of them.")
            self.dataset_name = self.train_dir  # what the result files record as the data
        self.dataset_name = expand(self.dataset_name or DEFAULT_DATASET)

    def command_flags(self) -> str:
        """The flags that name this data, for commands printed as hints."""
        options = ("train_dir", "validation_dir") if self.train_dir else (
            "dataset_name", "dataset_config_name", "dataset_revision", "image_column_name", "label_column_name")
        return " ".join(f"--{option} {getattr(self, option)}" for option in options if getattr(self, option))

    def recorded(self) -> dict:
        """Every data flag as a run used it (for its summary; `visualize.py RUN` reads them back)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass
class DataArguments(SourceArguments):
    """Where the images come from, which of them a script uses, and how they are held: the same for every script."""

    train_split: str = flag("train", "Split to train on.")
    eval_split: str | None = flag(
        None, f"Split to evaluate on. Default: the first of {EVAL_SPLIT_NAMES} that exists, else a held-out part of "
        "the training split (see --validation_split_percentage).")
    validation_split_percentage: float | None = flag(
        None, "Hold out this percentage (5 means 5 percent) of the training split for evaluation (fixed "
        "--split_seed). Used when set, or when the dataset has no evaluation split (then 5).")
    train_val_split: float | None = flag(
        None, "The same as a fraction (0.15 means 15 percent), transformers' example-script flag: "
        "--validation_split_percentage 100 x this. Give one of the two.")
    split_seed: int = flag(
        42, "Seed of the held-out split and of the --max_*_samples draws; keep it equal across scripts.")
    max_train_samples: int | None = flag(None, "Use N training images drawn at random (shuffled with --split_seed).")
    max_eval_samples: int | None = flag(None, "Use N evaluation images drawn at random (shuffled with --split_seed).")
    preprocessing_num_workers: int | None = flag(
        None, "Processes that decode images into memory (default: this process's share of the CPUs).")
    data_in_memory: str = flag(
        "auto", "Hold the decoded images in memory ('true'), read them from disk in DataLoader workers ('false'), or "
        "'auto': in memory when the decoded images fit this process's share of the free memory (half of it), else "
        "from a folder prepared by scripts/prepare_data.py.")
    eval_crop_fraction: float | None = flag(
        None, "Evaluation sees the centre square holding this fraction of each image's short side, resized to the "
        "model's size. Default: image size / stored short side, between 0.875 (224 of 256, ImageNet's convention) "
        "and 1 (images stored at the model's size, e.g. CIFAR-10).")
    decode_on_device: bool = flag(
        False, "Decode JPEGs of a prepared folder on the GPU with torchvision (needs torchvision with GPU JPEG "
        "decoding); DataLoader workers then only read bytes.")

    def __post_init__(self):
        super().__post_init__()
        # --train_val_split (a fraction, transformers' examples) and --validation_split_percentage (a percentage) are
        # one setting, kept in `validation_split_percentage`; a percentage under 1 is taken for a mistaken fraction
        percentage, fraction = self.validation_split_percentage, self.train_val_split
        if self.validation_dir and (percentage is not None or fraction is not None):
            raise ValueError("--validation_dir gives the evaluation images; --train_val_split / "
                             "--validation_split_percentage would hold out others. Give one or the other.")
        if fraction is None and percentage is not None and 0 < percentage < 1:
            raise ValueError(
                f"--validation_split_percentage {percentage:g} would hold out {percentage:g} % of the training split "
                f"(1 image in {100 / percentage:,.0f}). It is a percentage (5 = 5 %); for a fraction use "
                f"--train_val_split {percentage:g} (= {100 * percentage:g} %).")
        if fraction is not None:
            if not 0 < fraction < 1:
                hint = f" For {fraction:g} % use --train_val_split {fraction / 100:g}." if 1 <= fraction < 100 else ""
                raise ValueError(f"--train_val_split is a fraction in (0, 1) (0.15 = 15 %), got {fraction:g}.{hint}")
            self.validation_split_percentage = round(100 * fraction, 10)
            if percentage is not None and not math.isclose(percentage, self.validation_split_percentage):
                raise ValueError(f"--train_val_split {fraction:g} ({self.validation_split_percentage:g} %) and "
                                 f"--validation_split_percentage {percentage:g} disagree; give one of them.")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 0:
            raise ValueError(f"--preprocessing_num_workers must be >= 0, got {self.preprocessing_num_workers}.")
        for option in ("max_train_samples", "max_eval_samples"):
            if getattr(self, option) is not None and getattr(self, option) < 1:
                raise ValueError(f"--{option} must be at least 1, got {getattr(self, option)}.")
        self.data_in_memory = str(self.data_in_memory).lower()
        if self.data_in_memory not in IN_MEMORY_CHOICES:
            raise ValueError(f"--data_in_memory must be auto, true or false, got {self.data_in_memory!r}.")
        if self.eval_crop_fraction is not None and not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"--eval_crop_fraction is a fraction of the short side in (0, 1], got "
                             f"{self.eval_crop_fraction}.")
