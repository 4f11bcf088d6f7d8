"""Image data for every script: load (Hub id or local folder), pick splits and columns, decode once to uint8,
then normalise and augment whole batches with torch on the training device.

Decoding happens once per dataset (cached by `datasets`); the training loop only indexes a uint8 tensor, which can
live in GPU memory, and `BatchTransform` crops, flips and normalises the batch where the model runs.
"""

import glob
import math
import os
import sys
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from .augment import random_erasing

IMAGE_COLUMN_NAMES = ("img", "image", "pixel_values", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
DEFAULT_DATASET = "uoft-cs/cifar10"
IMAGEFOLDER_NAMES = ("imagefolder", "nateraw/image-folder")  # what transformers' examples pass with --train_dir
MIN_EVAL_IMAGES = 10  # fewer make every accuracy a coarse step (1 image = 10 % or more)


@dataclass
class DataArguments:
    """Where the images come from. Shared by all scripts, so every protocol reads data the same way."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset id (default {DEFAULT_DATASET}), or a local folder (parquet files such as "
                          "train.parquet/test.parquet, an imagefolder tree, or a `save_to_disk` folder), or a single "
                          ".parquet file. Not with --train_dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of training images, one subfolder per class (train_dir/cat/1.png, ...), read as "
                          "a `datasets` imagefolder; instead of --dataset_name, as in transformers' example scripts."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of evaluation images laid out like --train_dir (needs --train_dir)."})
    image_column_name: str | None = field(
        default=None, metadata={"help": f"Image column; found by type or by name {IMAGE_COLUMN_NAMES} when unset."})
    label_column_name: str | None = field(
        default=None, metadata={"help": f"Label column; found by type or by name {LABEL_COLUMN_NAMES} when unset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": f"Split to evaluate on. Default: the first of {EVAL_SPLIT_NAMES} that exists, else a "
                          "held-out part of the training split (see --validation_split_percentage)."})
    validation_split_percentage: float | None = field(
        default=None,
        metadata={"help": "Hold out this percentage (5 means 5 percent) of the training split for evaluation (fixed "
                          "--split_seed). Used when set, or when the dataset has no evaluation split (then 5)."})
    train_val_split: float | None = field(
        default=None,
        metadata={"help": "The same as a fraction (0.15 means 15 percent), transformers' example-script flag: "
                          "--validation_split_percentage 100 x this. Give one of the two."})
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the held-out split and of the --max_*_samples draws; keep it equal across "
                          "scripts."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use N training images drawn at random (shuffled with --split_seed)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use N evaluation images drawn at random (shuffled with --split_seed)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads and decoding."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for decoding."})
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Leave out images that cannot be decoded (corrupt or empty files) instead of stopping; "
                          "they are counted, printed and listed in the result files."})

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
        self._reconcile_held_out_fraction()
        for option in ("max_train_samples", "max_eval_samples"):
            if getattr(self, option) is not None and getattr(self, option) < 1:
                raise ValueError(f"--{option} must be at least 1, got {getattr(self, option)}.")

    def command_flags(self) -> str:
        """The flags that name this data, for commands printed as hints."""
        if self.train_dir:
            return f"--train_dir {self.train_dir}" + (f" --validation_dir {self.validation_dir}"
                                                      if self.validation_dir else "")
        return f"--dataset_name {self.dataset_name}"

    def recorded(self) -> dict:
        """Every data flag as a run used it (for its summary; `visualize.py RUN` reads them back)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def _reconcile_held_out_fraction(self):
        """--train_val_split (a fraction, transformers' examples) and --validation_split_percentage (a percentage)
        are one setting: both end up in `validation_split_percentage`; a percentage under 1 is taken for a
        mistaken fraction."""
        percentage, fraction = self.validation_split_percentage, self.train_val_split
        if self.validation_dir and (percentage is not None or fraction is not None):
            raise ValueError("--validation_dir gives the evaluation images; --train_val_split / "
                             "--validation_split_percentage would hold out others. Give one or the other.")
        if fraction is None:
            if percentage is not None and 0 < percentage < 1:
                raise ValueError(
                    f"--validation_split_percentage {percentage:g} would hold out {percentage:g} % of the training "
                    f"split (1 image in {100 / percentage:,.0f}). It is a percentage (5 = 5 %); for a fraction use "
                    f"--train_val_split {percentage:g} (= {100 * percentage:g} %).")
            return
        if not 0 < fraction < 1:
            hint = f" For {fraction:g} % use --train_val_split {fraction / 100:g}." if 1 <= fraction < 100 else ""
            raise ValueError(f"--train_val_split is a fraction in (0, 1) (0.15 = 15 %), got {fraction:g}.{hint}")
        as_percentage = round(100 * fraction, 10)
        if percentage is not None and not math.isclose(percentage, as_percentage):
            raise ValueError(f"--train_val_split {fraction:g} ({as_percentage:g} %) and --validation_split_percentage "
                             f"{percentage:g} disagree; give one of them.")
        self.validation_split_percentage = as_percentage


@dataclass
class ImageArrays:
    """Decoded images of one split: uint8 `(N, C, H, W)`, labels `(N,)` or None, class names or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    split: str = ""  # where the images came from, e.g. "test" or "train (5% held out, seed 42)"
    skipped: list[str] = field(default_factory=list)  # undecodable images left out (--skip_bad_images): "row N ..."

    def __len__(self):
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Classes of the label column: its class names when it has them, else the largest label + 1 (after
        `validate_labels`, the evaluation split's labels are a subset of the training split's)."""
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def labelled(self) -> "ImageArrays":
        """The images that have a label (pretraining accepts -1 / None as "unlabelled"; those are left out)."""
        keep = self.labels >= 0
        if bool(keep.all()):
            return self
        return ImageArrays(self.images[keep], self.labels[keep], self.class_names, self.split, self.skipped)


def load_raw_dataset(args: DataArguments, token: str | None = None):
    """A `DatasetDict` from image folders (--train_dir/--validation_dir), a Hub id (read with `token`, if given), a
    local folder or a parquet file."""
    import datasets

    if args.train_dir is not None:
        return load_image_folders(args)
    name = args.dataset_name
    if os.path.isfile(name):
        if not name.endswith(".parquet"):
            raise ValueError(f"--dataset_name {name}: a single file must be a .parquet file.")
        check_parquet_files([name])
        try:
            return datasets.load_dataset("parquet", data_files={"train": name}, cache_dir=args.cache_dir)
        except Exception as error:
            raise ValueError(f"--dataset_name {name}: could not read this parquet file ({error}).") from error
    if os.path.isdir(name):
        check_parquet_files(glob.glob(os.path.join(name, "**", "*.parquet"), recursive=True))
        if os.path.exists(os.path.join(name, "dataset_dict.json")):
            return datasets.load_from_disk(name)
        if os.path.exists(os.path.join(name, "state.json")):
            return datasets.DatasetDict({"train": datasets.load_from_disk(name)})
        try:
            return datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
        except Exception as error:
            raise ValueError(
                f"--dataset_name {name}: could not read this folder as a dataset ({error}). Expected parquet files "
                "(train.parquet, test.parquet), an imagefolder tree (train/<class>/*.png) or a save_to_disk folder."
            ) from error
    if looks_local(name):
        raise ValueError(f"--dataset_name {name}: no such file or folder. {folder_listing(name)}")
    try:
        return datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, token=token)
    except Exception as error:
        raise ValueError(
            f"--dataset_name {name}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Without network access, pass a local folder of parquet files (train.parquet, test.parquet), an "
            "imagefolder tree or a save_to_disk folder."
        ) from error


def load_image_folders(args: DataArguments):
    """--train_dir (and --validation_dir) as a `datasets` imagefolder: splits train (and validation), labels from
    the class subfolders."""
    import datasets

    data_files = {"train": args.train_dir}
    if args.validation_dir is not None:
        data_files["validation"] = args.validation_dir
    for split, folder in data_files.items():
        option = "--train_dir" if split == "train" else "--validation_dir"
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {folder}: no such folder. {folder_listing(folder)}")
        data_files[split] = os.path.join(folder, "**")
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its bars say "Downloading data" for files that are read where they lie
    try:
        return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=args.cache_dir)
    except Exception as error:
        raise ValueError(f"--train_dir/--validation_dir: could not read the images ({error}). Expected one subfolder "
                         "per class holding image files (train_dir/cat/1.png, ...).") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def check_parquet_files(paths) -> None:
    """Refuse empty (0-byte) parquet files by name: an interrupted copy; the reader's own error names no file."""
    empty = sorted(path for path in paths if os.path.getsize(path) == 0)
    if empty:
        raise ValueError(f"--dataset_name: {len(empty)} parquet file(s) are empty (0 bytes): {', '.join(empty[:5])}. "
                         "Copy or write them again.")


def looks_local(path: str) -> bool:
    """Whether a name that does not exist here was meant as a local path rather than a Hub id: it says so
    (./, /, ~), has more than one slash, or its folder exists here (a typo in `runs/mea`)."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def folder_listing(path: str) -> str:
    """What exists next to a missing path, for error messages."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not os.path.isdir(parent):
        return f"Its folder {parent} does not exist either."
    entries = sorted(os.listdir(parent))
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} in all)" if len(entries) > 20 else "")
    return f"{parent} holds: {shown or 'nothing'}."


def as_images(dataset, column: str):
    """The dataset with `column` decoded as images: parquet files written without Hugging Face metadata hold
    images as {bytes, path} structs, which become `Image` features here."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return dataset.cast_column(column, datasets.Image())
    raise ValueError(f"Column {column!r} holds {feature}, not images; pass --image_column_name with the image column "
                     f"(columns: {list(dataset.column_names)}).")


def find_column(dataset, kind: str, name: str | None = None, required: bool = True) -> str | None:
    """The `kind` ("image" or "label") column: `name` if given (it must exist), else the first column of the
    matching feature type (`Image` / `ClassLabel`), else the first conventional name."""
    import datasets

    feature_type, candidates = {"image": (datasets.Image, IMAGE_COLUMN_NAMES),
                                "label": (datasets.ClassLabel, LABEL_COLUMN_NAMES)}[kind]
    columns = list(dataset.column_names)
    if name is not None:
        if name not in columns:
            raise ValueError(f"--{kind}_column_name {name!r} is not a column of the dataset; columns: {columns}.")
        return name
    typed = [column for column, feature in dataset.features.items() if isinstance(feature, feature_type)]
    named = [column for column in candidates if column in columns]
    if typed or named:
        return (typed + named)[0]
    if required:
        raise ValueError(f"No {kind} column found among {columns}; pass --{kind}_column_name.")
    return None


def select_splits(raw, args: DataArguments):
    """(train, eval) `Dataset`s: the named splits, or train minus a held-out part with a fixed seed."""
    splits = list(raw.keys())
    if args.train_split not in raw:
        raise ValueError(f"--train_split {args.train_split!r} does not exist; the dataset has splits {splits}.")
    train, names = raw[args.train_split], [args.train_split]
    if args.eval_split is not None:
        if args.eval_split not in raw:
            raise ValueError(f"--eval_split {args.eval_split!r} does not exist; the dataset has splits {splits}.")
        evaluation, names = raw[args.eval_split], names + [args.eval_split]
    else:
        named = [s for s in EVAL_SPLIT_NAMES if s in raw and s != args.train_split]
        if named and args.validation_split_percentage is None:
            evaluation, names = raw[named[0]], names + [named[0]]
        else:
            percentage = 5.0 if args.validation_split_percentage is None else args.validation_split_percentage
            if not 0 < percentage < 100:
                raise ValueError(f"--validation_split_percentage must lie in (0, 100), got {percentage}.")
            parts = train.train_test_split(test_size=percentage / 100, seed=args.split_seed, shuffle=True)
            train, evaluation = parts["train"], parts["test"]
            held_out = f"{percentage:g}% of {args.train_split} held out, seed {args.split_seed}"
            names = [f"{args.train_split} minus {held_out}", held_out]
    # As transformers' example scripts: shuffle with the seed, then take N (a random subset, not the first N).
    if args.max_train_samples is not None:
        train = train.shuffle(seed=args.split_seed).select(range(min(args.max_train_samples, len(train))))
        names[0] += f", {len(train)} drawn with seed {args.split_seed}"
    if args.max_eval_samples is not None:
        evaluation = evaluation.shuffle(seed=args.split_seed).select(range(min(args.max_eval_samples,
                                                                                len(evaluation))))
        names[1] += f", {len(evaluation)} drawn with seed {args.split_seed}"
    return train, evaluation, names


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit samples (PNG "I" holds 16-bit ones too)


def to_8_bit(image):
    """16-bit and float images as 8-bit greyscale, scaled (0..65535 -> 0..255, floats 0..1 -> 0..255): PIL's own
    convert("RGB"/"L") clips those samples at 255, which turns a 16-bit image white."""
    from PIL import Image

    if image.mode in HIGH_BIT_DEPTH_MODES:
        samples = np.asarray(image).astype(np.float64) / 257
    elif image.mode == "F":
        samples = np.asarray(image).astype(np.float64) * 255
    else:
        return image
    return Image.fromarray(np.clip(np.rint(samples), 0, 255).astype(np.uint8), "L")


def _to_uint8(image, image_size: int, num_channels: int) -> np.ndarray:
    image = to_8_bit(image).convert("RGB" if num_channels == 3 else "L")
    if image.size != (image_size, image_size):
        from PIL import Image

        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def source_rows(dataset, positions) -> list[int]:
    """Row numbers in the loaded split (file order) of `positions` in `dataset`, which may be a selection, a
    shuffle or a held-out part of it."""
    positions = [int(position) for position in positions]
    if dataset._indices is None:  # not a selection: positions are rows
        return positions
    column = dataset._indices.column(0)
    return [column[position].as_py() for position in positions]


def _decode_one(value, image_size: int, num_channels: int):
    """(uint8 HWC array, None) or (None, why it cannot be decoded) for one undecoded image {bytes, path}."""
    import datasets
    from PIL import UnidentifiedImageError

    data, path = (value or {}).get("bytes"), (value or {}).get("path")
    if data is None and not path:
        return None, "the image is missing (None)"
    if (data is not None and len(data) == 0) or (data is None and os.path.isfile(path) and not os.path.getsize(path)):
        return None, "the image is an empty (0-byte) file"
    try:
        image = datasets.Image().decode_example(value)
        return _to_uint8(image, image_size, num_channels), None
    except UnidentifiedImageError:
        return None, "not an image in a format PIL reads (corrupt or not an image file)"
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ...) for a bad file: all mean "bad"
        return None, " ".join(f"{type(error).__name__}: {error}".split())


def decode(dataset, image_column: str, label_column: str | None, image_size: int, num_channels: int = 3,
           num_proc: int | None = None, skip_bad_images: bool = False, split: str = "") -> ImageArrays:
    """Decode every image once to uint8 `(N, C, H, W)` (RGB or grey, resized to `image_size`). An image that
    cannot be decoded is an error naming the split, its row (and file) and how many there are; with
    `skip_bad_images` such images are left out and listed in `ImageArrays.skipped`."""
    import datasets

    blank = np.zeros((image_size, image_size, num_channels), dtype=np.uint8)

    def convert(batch):
        pixels, problems = [], []
        for value in batch[image_column]:
            array, problem = _decode_one(value, image_size, num_channels)
            pixels.append(blank if array is None else array)
            problems.append(problem)
        return {"pixels": pixels, "problem": problems}

    features = datasets.Features({"pixels": datasets.Array3D((image_size, image_size, num_channels), "uint8"),
                                  "problem": datasets.Value("string")})
    undecoded = dataset.cast_column(image_column, datasets.Image(decode=False))
    decoded = undecoded.map(convert, batched=True, batch_size=256, num_proc=num_proc, features=features,
                            remove_columns=dataset.column_names, desc="Decoding images")
    problems = decoded.select_columns("problem").with_format("arrow")[:].column("problem")
    bad = np.flatnonzero(problems.is_valid().to_numpy(zero_copy_only=False))
    skipped = []
    if len(bad):
        rows = source_rows(dataset, bad)
        paths = list(undecoded.select(bad[:1000].tolist())[image_column])  # the file of an imagefolder image
        described = [f"row {row}" + (f" ({value['path']})" if value and value.get("path") else "")
                     for row, value in zip(rows, paths + [None] * (len(rows) - len(paths)))]
        if not skip_bad_images:
            raise ValueError(
                f"Split {split!r}: {len(bad)} of {len(dataset)} images cannot be decoded; the first is "
                f"{described[0]}: {problems[int(bad[0])].as_py()}. Fix or remove them, or pass --skip_bad_images "
                "true to leave them out (they are then counted and listed in the results).")
        skipped = described
        print(f"[data] split {split!r}: skipped {len(bad)} image(s) that cannot be decoded (--skip_bad_images):"
              f" {', '.join(described[:5])}{', ...' if len(bad) > 5 else ''}", flush=True)
    keep = np.setdiff1d(np.arange(len(dataset)), bad)
    pixels = decoded.with_format("numpy", dtype=np.uint8)[:]["pixels"]
    images = torch.from_numpy(pixels[keep] if len(bad) else pixels).permute(0, 3, 1, 2).contiguous()
    labels, class_names = None, None
    if label_column is not None:
        labels = torch.as_tensor(label_values(dataset, label_column)[keep], dtype=torch.long)
        feature = dataset.features[label_column]
        class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return ImageArrays(images, labels, class_names, skipped=skipped)


def skipped_images(*splits: ImageArrays) -> dict:
    """{split: [skipped rows]} for the result files: the images --skip_bad_images left out (empty lists if none)."""
    return {split.split: list(split.skipped) for split in splits}


def label_values(dataset, column: str) -> np.ndarray:
    """The labels as int64, -1 for a missing one (None, NaN); `validate_labels` has checked them before."""
    values = dataset.select_columns(column).with_format("arrow")[:].column(column).to_numpy(zero_copy_only=False)
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), -1, values).astype(np.int64)


def shorten(value, limit: int = 60) -> str:
    """repr of a value for an error message, cut to `limit` characters (a label column may hold image bytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_labels(dataset, column: str, split: str, class_names: list[str] | None = None,
                    allowed: set[int] | None = None, allow_unlabelled: bool = False) -> None:
    """Check one split's labels before any decoding or training.

    Labels must be integer class indices in [0, len(class_names)) (or >= 0 without class names) and, with
    `allowed` (the training split's labels, for the evaluation split), one of those. A missing label (None) or -1
    means "unlabelled": an error for a classifier, accepted with `allow_unlabelled` (pretraining). Errors name the
    split, the row of the first bad label and how many there are."""
    import pyarrow as pa

    array = dataset.select_columns(column).with_format("arrow")[:].column(column).combine_chunks()
    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        bad = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
        if len(bad):
            raise ValueError(
                f"Split {split!r}: the label column {column!r} holds {kind} values, not integer class indices "
                f"(row {source_rows(dataset, bad[:1])[0]}: {shorten(array[int(bad[0])].as_py())}). Pass "
                "--label_column_name with the integer label column, or store the labels as a ClassLabel column.")
    values = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)  # None -> NaN
    missing = np.isnan(values)
    fractional = ~missing & (values != np.round(values))
    upper = len(class_names) if class_names else None
    too_small = values < (0 if not allow_unlabelled else -1)  # -1 is "unlabelled" where that is allowed
    out_of_range = ~missing & ~fractional & (too_small | ((values >= upper) if upper is not None else False))
    range_text = (f"[0, {upper}) (the {upper} class names of the label column)" if upper is not None
                  else "[0, number of classes)")
    checks = [(fractional, "are not integers", "labels are integer class indices")]
    if not allow_unlabelled:
        checks.append((missing, "are missing (None)",
                       "every image needs a label here; drop or fix those rows, or use a labelled split"))
    minus_one = bool(out_of_range.any()) and values[out_of_range][0] == -1  # the first bad label says which hint
    checks.append((out_of_range, f"lie outside {range_text}",
                   "-1 means 'unlabelled' (e.g. STL-10's unlabelled images), which only pretraining accepts; use a "
                   "labelled split" if minus_one else "fix those rows, or the class names of the label column"))
    if allowed is not None:
        unseen = ~missing & (values != -1) & ~out_of_range & ~fractional & ~np.isin(values, sorted(allowed))
        checks.append((unseen, "are classes that the training split does not have",
                       "the classifier could never predict them; use splits with the same classes"))
    for wrong, what, how in checks:
        bad = np.flatnonzero(wrong)
        if len(bad):
            first = int(bad[0])
            raise ValueError(
                f"Split {split!r}, label column {column!r}: {len(bad)} of {len(values)} labels {what}; the first "
                f"is row {source_rows(dataset, [first])[0]} ({shorten(array[first].as_py())}). "
                f"{how[0].upper()}{how[1:]}.")


def load_image_splits(args: DataArguments, image_size: int, num_channels: int = 3,
                      require_labels: bool = False, token: str | None = None) -> tuple[ImageArrays, ImageArrays]:
    """Train and eval splits as decoded arrays; every bad flag fails here, before any training starts."""
    raw = load_raw_dataset(args, token=token)
    train, evaluation, names = select_splits(raw, args)
    if 0 < len(evaluation) < MIN_EVAL_IMAGES:
        print(f"warning: the evaluation split ({names[1]}) has only {len(evaluation)} image(s): one image moves its "
              f"accuracy by {100 / len(evaluation):.0f} points, so its numbers mean little. Evaluate on more images "
              "(a larger --train_val_split, --max_eval_samples, or an evaluation split).", file=sys.stderr, flush=True)
    image_column = find_column(train, "image", args.image_column_name)
    label_column = find_column(train, "label", args.label_column_name, required=require_labels)
    for column in (image_column, label_column):
        if column is not None and column not in evaluation.column_names:
            raise ValueError(f"The evaluation split ({names[1]}) has no column {column!r}; its columns: "
                             f"{list(evaluation.column_names)}.")
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError(f"Empty split: {len(train)} training and {len(evaluation)} evaluation images.")
    class_names = check_labels(train, evaluation, label_column, names, allow_unlabelled=not require_labels)
    train, evaluation = as_images(train, image_column), as_images(evaluation, image_column)
    arrays = []
    for split, name in zip((train, evaluation), names):
        decoded = decode(split, image_column, label_column, image_size, num_channels, args.preprocessing_num_workers,
                         skip_bad_images=args.skip_bad_images, split=name)
        decoded.split, decoded.class_names = name, class_names
        arrays.append(decoded)
    return tuple(arrays)


def check_labels(train, evaluation, column: str | None, names, allow_unlabelled: bool) -> list[str] | None:
    """Validate both splits' labels (`validate_labels`) and that their class names agree; the class names."""
    import datasets

    if column is None:
        return None
    class_names = [list(split.features[column].names) if isinstance(split.features[column], datasets.ClassLabel)
                   else None for split in (train, evaluation)]
    if None not in class_names and class_names[0] != class_names[1]:
        raise ValueError(f"The class names of split {names[0]!r} ({class_names[0]}) and split {names[1]!r} "
                         f"({class_names[1]}) differ: the same label would mean different classes. Use splits with "
                         "the same ClassLabel names.")
    class_names = class_names[0] or class_names[1]
    validate_labels(train, column, names[0], class_names, allow_unlabelled=allow_unlabelled)
    seen = set(label_values(train, column).tolist()) - {-1}
    validate_labels(evaluation, column, names[1], class_names, allowed=seen or None,
                    allow_unlabelled=allow_unlabelled)
    return class_names


class ArrayDataset(torch.utils.data.Dataset):
    """Tensors indexed together, fetched a whole batch at a time (`__getitems__`: one gather per batch).

    Yields `pixel_values` (uint8, transformed on the device by the trainer) plus optional `labels` and `noise`
    (fixed masking noise, so evaluation losses are comparable).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None):
        self.tensors = {"pixel_values": pixel_values}
        if labels is not None:
            self.tensors["labels"] = labels
        if noise is not None:
            self.tensors["noise"] = noise

    def __len__(self):
        return self.tensors["pixel_values"].shape[0]

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.tensors.items()}

    def __getitems__(self, indices):
        device = self.tensors["pixel_values"].device
        index = torch.as_tensor(indices)
        if device.type == "cuda":  # from pinned memory the copy is asynchronous: no wait for the GPU's queue
            index = index.pin_memory().to(device, non_blocking=True)
        return {key: value[index] for key, value in self.tensors.items()}

    def to(self, device) -> "ArrayDataset":
        self.tensors = {key: value.to(device) for key, value in self.tensors.items()}
        return self


def collate(batch):
    """Batches from `ArrayDataset.__getitems__` are already stacked; single items (other loaders) get stacked."""
    if isinstance(batch, dict):
        return batch
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}


def fixed_noise(num_images: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise that is the same at every evaluation."""
    return torch.rand(num_images, num_patches, generator=torch.Generator().manual_seed(seed))


def random_resized_crop(images: torch.Tensor, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        hflip: bool = False) -> torch.Tensor:
    """Random-resized-crop (and optional horizontal flip) of a float batch with one `grid_sample`.

    Each image gets a crop of area fraction in `scale` and log-uniform aspect ratio in `ratio`, clipped to the image
    (torchvision redraws instead of clipping), resampled bilinearly to `size`.
    """
    batch, device = images.shape[0], images.device
    area = torch.empty(batch, device=device).uniform_(*scale)
    aspect = torch.empty(batch, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    # Crop centres in [-1, 1] coordinates, keeping the crop inside the image.
    center_x = (torch.rand(batch, device=device) * 2 - 1) * (1 - width)
    center_y = (torch.rand(batch, device=device) * 2 - 1) * (1 - height)
    if hflip:
        width = width * (torch.randint(0, 2, (batch,), device=device) * 2 - 1)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width, center_x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchTransform:
    """uint8 `(B, C, H, W)` -> normalised float batch, with optional random-resized-crop and flip, then optional
    `augment` (a batch op on floats in [0, 1], e.g. `augment.RandAugment`), normalisation, and optional random
    erasing with probability `random_erasing` (in normalised space).

    Runs on whatever device the batch is on: on a GPU the augmentation costs almost nothing.
    """

    def __init__(self, image_size: int, mean, std, crop_scale: tuple[float, float] | None = None,
                 hflip: bool = False, augment=None, random_erasing: float = 0.0):
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
        self.augment, self.random_erasing = augment, random_erasing
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchTransform expects uint8 images, got {images.dtype}.")
        x = images.float().div_(255)
        if self.crop_scale is not None:
            x = random_resized_crop(x, self.image_size, self.crop_scale, hflip=self.hflip)
        else:
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            if self.hflip:
                flip = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.augment is not None:
            x = self.augment(x)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.random_erasing > 0:
            x = random_erasing(x, self.random_erasing)
        return x

    @classmethod
    def for_model(cls, config, crop_scale=None, hflip=False, augment=None, random_erasing=0.0) -> "BatchTransform":
        return cls(config.image_size, config.image_mean, config.image_std, crop_scale, hflip, augment, random_erasing)
