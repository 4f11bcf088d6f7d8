"""Image data for every script: load (Hub id or local folder), pick splits and columns, decode once to uint8,
then normalise and augment whole batches with torch on the training device.

Decoding happens once per dataset (cached by `datasets`); the training loop only indexes a uint8 tensor, which can
live in GPU memory, and `BatchTransform` crops, flips and normalises the batch where the model runs.
"""

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_COLUMN_NAMES = ("img", "image", "pixel_values", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


@dataclass
class DataArguments:
    """Where the images come from. Shared by all scripts, so every protocol reads data the same way."""

    dataset_name: str = field(
        default="uoft-cs/cifar10",
        metadata={"help": "Hub dataset id, or a local folder (parquet files such as train.parquet/test.parquet, an "
                          "imagefolder tree, or a `save_to_disk` folder), or a single .parquet file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
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
        metadata={"help": "Hold out this percentage of the training split for evaluation (fixed --split_seed). "
                          "Used when set, or when the dataset has no evaluation split (then 5)."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split; keep it equal across scripts."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation images."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads and decoding."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for decoding."})

    def __post_init__(self):
        self.dataset_name = os.path.expanduser(self.dataset_name)  # "~" from a config file, where no shell expands it


@dataclass
class ImageArrays:
    """Decoded images of one split: uint8 `(N, C, H, W)`, labels `(N,)` or None, class names or None."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    split: str = ""  # where the images came from, e.g. "test" or "train (5% held out, seed 42)"

    def __len__(self):
        return self.images.shape[0]


def load_raw_dataset(args: DataArguments):
    """A `DatasetDict` from a Hub id, a local folder or a parquet file."""
    import datasets

    name = args.dataset_name
    if os.path.isfile(name):
        if not name.endswith(".parquet"):
            raise ValueError(f"--dataset_name {name}: a single file must be a .parquet file.")
        return datasets.load_dataset("parquet", data_files={"train": name}, cache_dir=args.cache_dir)
    if os.path.isdir(name):
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
        return datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:
        raise ValueError(
            f"--dataset_name {name}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Without network access, pass a local folder of parquet files (train.parquet, test.parquet), an "
            "imagefolder tree or a save_to_disk folder."
        ) from error


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
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
        names[0] += f", first {len(train)}"
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
        names[1] += f", first {len(evaluation)}"
    return train, evaluation, names


def _to_uint8(image, image_size: int, num_channels: int) -> np.ndarray:
    image = image.convert("RGB" if num_channels == 3 else "L")
    if image.size != (image_size, image_size):
        from PIL import Image

        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def decode(dataset, image_column: str, label_column: str | None, image_size: int, num_channels: int = 3,
           num_proc: int | None = None) -> ImageArrays:
    """Decode every image once to uint8 `(N, C, H, W)` (RGB or grey, resized to `image_size`)."""
    import datasets

    def convert(batch):
        return {"pixels": [_to_uint8(image, image_size, num_channels) for image in batch[image_column]]}

    features = datasets.Features({"pixels": datasets.Array3D((image_size, image_size, num_channels), "uint8")})
    decoded = dataset.map(convert, batched=True, batch_size=256, num_proc=num_proc, features=features,
                          remove_columns=dataset.column_names, desc="Decoding images")
    pixels = decoded.with_format("numpy", dtype=np.uint8)[:]["pixels"]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    labels, class_names = None, None
    if label_column is not None:
        labels = torch.as_tensor(dataset.select_columns(label_column).with_format("numpy")[:][label_column],
                                 dtype=torch.long)
        feature = dataset.features[label_column]
        class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return ImageArrays(images, labels, class_names)


def load_image_splits(args: DataArguments, image_size: int, num_channels: int = 3,
                      require_labels: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """Train and eval splits as decoded arrays; every bad flag fails here, before any training starts."""
    raw = load_raw_dataset(args)
    train, evaluation, names = select_splits(raw, args)
    image_column = find_column(train, "image", args.image_column_name)
    label_column = find_column(train, "label", args.label_column_name, required=require_labels)
    for column in (image_column, label_column):
        if column is not None and column not in evaluation.column_names:
            raise ValueError(f"The evaluation split ({names[1]}) has no column {column!r}; its columns: "
                             f"{list(evaluation.column_names)}.")
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError(f"Empty split: {len(train)} training and {len(evaluation)} evaluation images.")
    train, evaluation = as_images(train, image_column), as_images(evaluation, image_column)
    arrays = []
    for split, name in zip((train, evaluation), names):
        decoded = decode(split, image_column, label_column, image_size, num_channels, args.preprocessing_num_workers)
        decoded.split = name
        arrays.append(decoded)
    return tuple(arrays)


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
    """uint8 `(B, C, H, W)` -> normalised float batch, with optional random-resized-crop and flip.

    Runs on whatever device the batch is on: on a GPU the augmentation costs almost nothing.
    """

    def __init__(self, image_size: int, mean, std, crop_scale: tuple[float, float] | None = None,
                 hflip: bool = False):
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
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
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @classmethod
    def for_model(cls, config, crop_scale=None, hflip=False) -> "BatchTransform":
        return cls(config.image_size, config.image_mean, config.image_std, crop_scale, hflip)
