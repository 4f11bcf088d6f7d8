"""Image data for every script, from where it lies to the batch the model sees. `load_image_splits` is the one entry
point: every bad flag or input fails there, before any training starts.

    arguments.py  the data flags the scripts share
    readers.py    the interfaces every kind of source is read through (`ImageSource`, `ImageReader`), `open_source`
    sources.py    what `datasets` loads (a Hub id, a dataset folder or file) and image folders; splits, columns, rows
    labels.py     labels checked before any decoding
    decode.py     one image's bytes -> uint8 pixels in the shared geometry, on a fixed canvas
    memory.py     a split decoded once into one tensor (fits in memory)
    streaming.py  a split decoded batch by batch in DataLoader workers (does not)
    policy.py     which of the two, decided once and said
    splits.py     one split however held (ImageData), the Dataset loaders read, a sequential pass
    prepared.py   the prepared-folder format (prepare.py writes it; scripts/prepare_data.py)
    transforms.py crop, flip, normalise whole batches on the training device
"""

import sys

import numpy as np
import torch

from ..cli import UsageError, print_once
from .arguments import DataArguments, SourceArguments
from .decode import Geometry
from .labels import check_labels
from .memory import InMemoryImages, cpus_per_process, decode_into_memory, header_sizes, keep_rows, storage_plan
from .policy import all_processes_agree, gigabytes, memory_budget
from .readers import ImageReader, ImageSource, open_source
from .sources import default_prepared_folder, select_splits, source_rows
from .splits import ImageData, ImageDataset, collate, fixed_noise, sequential_batches
from .streaming import DeviceJPEGDecoder, StreamedImages, default_workers
from .transforms import BatchTransform, default_eval_crop_fraction, stored_short_side

MIN_EVAL_IMAGES = 10  # fewer make every accuracy a coarse step (1 image = 10 % or more)
HEADER_SAMPLE = 256  # images whose headers estimate an unprepared split's decoded size

__all__ = ["BatchTransform", "DataArguments", "ImageData", "ImageDataset", "SourceArguments", "collate",
           "device_decoder", "eval_crop_fraction", "fixed_noise", "load_image_splits", "sequential_batches",
           "source_identity"]


def source_identity(args: DataArguments) -> dict:
    """What pins the data's content beyond its flags, for a run's settings (`ImageSource.identity`)."""
    return open_source(args).identity()


def eval_crop_fraction(args: DataArguments, image_size: int, data: ImageData) -> float:
    """--eval_crop_fraction, or its default for how the images are stored (see `default_eval_crop_fraction`)."""
    return args.eval_crop_fraction or default_eval_crop_fraction(image_size, data.short_side)


def device_decoder(args: DataArguments, num_channels: int, device, *splits: ImageData):
    """--decode_on_device: the GPU JPEG decoder for `splits` (read from a prepared folder of JPEGs), checked before
    any work; None without the flag."""
    if not args.decode_on_device:
        return None
    for split in splits:
        if split.in_memory:
            raise UsageError("--decode_on_device true decodes the JPEGs of a prepared folder read from disk; these "
                             "images are held in memory (--data_in_memory false reads them from disk).")
        if split.reader.encoding != "jpeg":
            raise ValueError(f"--decode_on_device true decodes the JPEGs of a prepared folder read from disk; "
                             f"{args.dataset_name} is not a prepared folder of JPEGs (scripts/prepare_data.py "
                             "--encoding jpeg).")
    canvas = (num_channels, max(split.canvas[1] for split in splits), max(split.canvas[2] for split in splits))
    return DeviceJPEGDecoder(canvas, device)


def suggested_prepare_command(args: DataArguments, image_size: int) -> str:
    """The prepare_data.py command for this data, at the short side a model of `image_size` wants (256 for 224)."""
    return (f"python scripts/prepare_data.py {args.command_flags()} --short_side {stored_short_side(image_size)} "
            f"--output_dir {default_prepared_folder(args)}")


class _Split:
    """One selected split on its way to `ImageData`: its reader and labels; `positions` are the rows of `dataset` still
    kept (bad images are left out along the way)."""

    def __init__(self, dataset, name: str, reader: ImageReader, labels, skipped=()):
        self.dataset, self.name, self.reader, self.labels = dataset, name, reader, labels
        self.skipped = list(skipped)  # left out before (when preparing); those left out here are added
        self.positions = np.arange(len(dataset))

    def __len__(self):
        return len(self.reader)

    def estimated_bytes(self, channels: int) -> int:
        """The memory `memory.py` would take for the decoded images (exact when prepared, else from a sample)."""
        indices = np.arange(len(self.reader))
        if not self.reader.stored and len(indices) > HEADER_SAMPLE:
            indices = np.sort(np.random.default_rng(0).choice(indices, HEADER_SAMPLE, replace=False))
        sizes, problems = header_sizes(self.reader, indices, workers=0)
        good = np.delete(sizes, sorted(problems), axis=0)
        return int(len(self.reader) * storage_plan(good, channels)[2] / len(good)) if len(good) else 0

    def leave_out(self, problems: dict, skip_bad_images: bool) -> np.ndarray:
        """{index: why} of images that cannot be decoded: an error naming the first, or (--skip_bad_images) they are
        listed and left out of the reader, labels and positions. Returns the indices kept."""
        kept = np.arange(len(self.reader))
        if not problems:
            return kept
        bad = sorted(problems)
        rows = source_rows(self.dataset, self.positions[bad])
        described = [f"row {row}{self.reader.describe(index)}" for row, index in zip(rows[:1000], bad)]
        if not skip_bad_images:
            raise ValueError(
                f"Split {self.name!r}: {len(bad)} of {len(self.dataset)} images cannot be decoded; the first is "
                f"{described[0]}: {problems[bad[0]]}. Fix or remove them, or pass --skip_bad_images true to leave "
                "them out (they are then counted and listed in the results).")
        described += [f"row {row}" for row in rows[1000:]]  # beyond 1000, their rows alone
        print_once(f"[data] split {self.name!r}: skipped {len(bad)} image(s) that cannot be decoded "
                   f"(--skip_bad_images): {', '.join(described[:5])}{', ...' if len(bad) > 5 else ''}")
        self.skipped += described
        kept = np.setdiff1d(kept, np.asarray(bad))
        if not len(kept):
            raise ValueError(f"Split {self.name!r}: none of its {len(self.dataset)} images can be decoded.")
        self.keep(kept)
        return kept

    def keep(self, indices: np.ndarray) -> None:
        """Only the images at `indices` (of the current reader) stay."""
        self.reader, self.positions = self.reader.subset(indices), self.positions[indices]
        self.labels = None if self.labels is None else self.labels[torch.as_tensor(indices)]


def _selected_splits(source: ImageSource, image_size: int, num_channels: int, require_labels: bool):
    """The two `_Split`s, their geometry and class names; all checks that need no decoding."""
    train, evaluation, names, keys, rows = select_splits(source.raw, source.args, source.source_rows)
    if 0 < len(evaluation) < MIN_EVAL_IMAGES:
        print_once(f"warning: the evaluation split ({names[1]}) has only {len(evaluation)} image(s): one image moves "
                   f"its accuracy by {100 / len(evaluation):.0f} points, so its numbers mean little. Evaluate on more "
                   "images (a larger --train_val_split, --max_eval_samples, or an evaluation split).", file=sys.stderr)
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError(f"Empty split: {len(train)} training and {len(evaluation)} evaluation images.")
    image_column, label_column = source.columns(train, evaluation, require_labels)
    if image_column not in evaluation.column_names:
        raise ValueError(f"The evaluation split ({names[1]}) has no column {image_column!r}; its columns: "
                         f"{list(evaluation.column_names)}.")
    evaluation_labelled = label_column is None or label_column in evaluation.column_names
    if not evaluation_labelled and require_labels:
        folder = source.validation_dir  # the images were listed from it (or prepared from it)
        if not folder:
            raise ValueError(
                f"The evaluation split ({names[1]}) has no labels (no column {label_column!r}; its columns: "
                f"{list(evaluation.column_names)}), and this script needs them. Use a labelled evaluation split "
                "(--eval_split), or hold out part of the training split (--validation_split_percentage).")
        again = f", then prepare it again ({source.args.dataset_name} holds its images unlabelled)" if source.stored \
            else ""
        raise ValueError(
            f"--validation_dir {folder} has no class subfolders (its images lie directly in it), so the evaluation "
            "images have no labels, and this script needs them. Lay it out like the training folder, one subfolder "
            f"per class: {folder}/<class>/image.jpg{again}.")
    class_names, labels = check_labels(train, evaluation if evaluation_labelled else None, label_column, names,
                                       allow_unlabelled=not require_labels)
    geometry = source.geometry(image_size, num_channels)
    splits = []
    for dataset, name, key, chosen, values in zip((train, evaluation), names, keys, rows, labels):
        if label_column is not None and values is None:
            values = np.full(len(dataset), -1)  # pretraining: an unlabelled evaluation split, no kNN monitor
        splits.append(_Split(dataset, name, source.reader(dataset, key, image_column, geometry),
                             None if values is None else torch.as_tensor(values, dtype=torch.long),
                             source.skipped(key, chosen)))
    return splits, geometry, class_names


def load_image_splits(args: DataArguments, image_size: int, num_channels: int = 3, require_labels: bool = False,
                      token: str | None = None, num_workers: int | None = None, first: int | None = None,
                      check=None, progress: bool = True) -> tuple[ImageData, ImageData]:
    """Train and eval splits as `ImageData`, decoded in memory or streamed from disk as --data_in_memory and the
    memory budget say (one decision for all processes of a run, printed). `num_workers`: DataLoader workers of a
    streamed split (None: this process's share of the CPUs). `first`: only the first N images of each split are
    decoded (pictures), nothing else. `check(train, evaluation)` (their `len()` and `labels`) runs before any image
    is decoded. `progress`: progress bars while reading and decoding. Every bad flag and input fails here."""
    source = open_source(args, token)
    splits, geometry, class_names = _selected_splits(source, image_size, num_channels, require_labels)
    if first is not None:
        for split in splits:
            split.keep(np.arange(min(first, len(split.reader))))
        return tuple(_image_data(split, geometry, class_names, True, 0, 0, args.skip_bad_images, progress)
                     for split in splits)
    if check is not None:
        check(*splits)
    decoded = sum(split.estimated_bytes(num_channels) for split in splits)
    budget, explained = memory_budget()
    fits = decoded <= budget
    in_memory = all_processes_agree(fits) if args.data_in_memory == "auto" else args.data_in_memory == "true"
    workers = default_workers() if num_workers is None else num_workers
    size = f"{'' if source.stored else 'about '}{gigabytes(decoded)} decoded"
    if in_memory:
        why = ("--data_in_memory true" + ("" if fits else f", although over the budget of {gigabytes(budget)}")
               if args.data_in_memory == "true" else f"fits the budget of {gigabytes(budget)} = {explained}")
        print_once(f"[data] in memory: {len(splits[0]):,} + {len(splits[1]):,} images of {source.description} "
                   f"({size}; {why})")
    elif not source.stored and args.data_in_memory == "auto":
        raise ValueError(
            f"The images of {args.dataset_name} take {size}, more than this process may hold in memory "
            f"({gigabytes(budget)} = {explained}). Prepare them once (scaled, stored for fast reading) and train "
            f"from the prepared folder: {suggested_prepare_command(args, image_size)}, then pass that --output_dir "
            "as --dataset_name. (--data_in_memory false reads them from the source instead, decoding and scaling "
            "every image in every epoch.)")
    elif not source.stored and args.skip_bad_images:
        raise ValueError(
            "--skip_bad_images true with images read from their source in every epoch (--data_in_memory false): a "
            "bad image would only show up during training, where it cannot be left out. Prepare the data once, "
            "which checks every image and leaves the bad ones out: "
            f"{suggested_prepare_command(args, image_size)} --skip_bad_images true, then train from that folder.")
    else:
        why = "--data_in_memory false" if args.data_in_memory == "false" else \
            f"over the memory budget of {gigabytes(budget)} = {explained}"
        print_once(f"[data] from disk: {len(splits[0]):,} + {len(splits[1]):,} images of {source.description}, read "
                   f"by {workers} DataLoader worker(s) per process ({size}; {why})")
        if not source.stored:
            print_once("note: the images are decoded and scaled from the source in every epoch; preparing them once is "
                       f"faster: {suggested_prepare_command(args, image_size)}", file=sys.stderr)
    decode_workers = args.preprocessing_num_workers
    if decode_workers is None:
        decode_workers = min(8, cpus_per_process()) if max(len(split) for split in splits) > 2048 else 0
    return tuple(_image_data(split, geometry, class_names, in_memory, workers, decode_workers, args.skip_bad_images,
                             progress) for split in splits)


def _image_data(split: _Split, geometry: Geometry, class_names, in_memory: bool, workers: int, decode_workers: int,
                skip_bad_images: bool, progress: bool = True) -> ImageData:
    sizes, problems = header_sizes(split.reader, np.arange(len(split.reader)), decode_workers,
                                   progress=f"Reading headers ({split.name})" if progress else None)
    sizes = sizes[split.leave_out(problems, skip_bad_images)]
    short_side = int(np.median(sizes.min(axis=1)))  # what the evaluation crop is relative to
    if not in_memory:
        canvas = storage_plan(sizes, geometry.num_channels)[0]
        return StreamedImages(split.reader, sizes, canvas, split.labels, class_names, split.name, split.skipped,
                              short_side, workers)
    images, problems, storage = decode_into_memory(
        split.reader, np.arange(len(sizes)), sizes, geometry.num_channels, decode_workers,
        progress=f"Decoding images ({split.name})" if progress else None)
    if problems:  # a header that reads, pixels that do not (a truncated file)
        images, sizes, storage = keep_rows(images, sizes, split.leave_out(problems, skip_bad_images), storage)
    data = InMemoryImages(images, torch.from_numpy(sizes), split.labels, class_names, split.name, split.skipped,
                          short_side, **storage)
    data.num_workers = 0 if images is not None else workers  # packed images are pasted onto canvases by workers
    return data
