"""Image data for every script, from where it lies to the batch the model sees:

    arguments.py  the data flags the scripts share
    sources.py    a DatasetDict from a Hub id, dataset folder or file, image folders (one scandir pass) or a prepared
                  folder; splits, columns, rows      (labels.py: labels checked before any decoding)
    decode.py     one image's bytes -> uint8 pixels in the shared geometry, on a fixed canvas
    readers.py    random access to a split's stored images
    memory.py     a split decoded once into one tensor (fits in memory)
    streaming.py  a split decoded batch by batch in DataLoader workers (does not)
    prepared.py   the prepared-folder format (prepare.py writes it; scripts/prepare_data.py)
    policy.py     which of the two, decided once and said
    transforms.py crop, flip, normalise whole batches on the training device

`load_image_splits` is the one entry point: every bad flag or input fails there, before any training starts.
"""

import sys

import numpy as np
import torch

from ..cli import UsageError
from .arguments import DataArguments, SourceArguments
from .decode import Geometry
from .labels import check_labels, label_values
from .memory import InMemoryImages, cpus_per_process, decode_into_memory, header_sizes, keep_rows
from .policy import all_processes_agree, gigabytes, memory_budget
from .prepared import geometry_of, is_prepared, prepared_reader, read_manifest
from .readers import DatasetReader
from .sources import as_undecoded_images, find_column, load_raw_dataset, select_splits, source_rows
from .splits import ImageData, ImageDataset, collate, fixed_noise, sequential_batches
from .streaming import StreamedImages, default_workers
from .transforms import BatchTransform, default_eval_crop_fraction

MIN_EVAL_IMAGES = 10  # fewer make every accuracy a coarse step (1 image = 10 % or more)
HEADER_SAMPLE = 256  # images whose headers estimate an unprepared split's decoded size

__all__ = ["BatchTransform", "DataArguments", "ImageData", "ImageDataset", "SourceArguments", "collate",
           "device_decoder", "eval_crop_fraction", "fixed_noise", "load_image_splits", "sequential_batches",
           "skipped_images"]


def skipped_images(*splits: ImageData) -> dict:
    """{split: [skipped rows]} for the result files: the images --skip_bad_images left out (empty lists if none)."""
    return {split.split: list(split.skipped) for split in splits}


def eval_crop_fraction(args: DataArguments, image_size: int, data: ImageData) -> float:
    """--eval_crop_fraction, or its default for how the images are stored (see `default_eval_crop_fraction`)."""
    return args.eval_crop_fraction or default_eval_crop_fraction(image_size, data.short_side)


def device_decoder(args: DataArguments, num_channels: int, device, *splits: ImageData):
    """--decode_on_device: the GPU JPEG decoder for `splits` (read from a prepared folder of JPEGs), checked before
    any work; None without the flag."""
    if not args.decode_on_device:
        return None
    for split in splits:
        encoding = getattr(getattr(split, "reader", None), "encoding", None)
        if split.in_memory:
            raise UsageError("--decode_on_device true decodes the JPEGs of a prepared folder read from disk; these "
                             "images are held in memory (--data_in_memory false reads them from disk).")
        if encoding != "jpeg":
            raise ValueError(f"--decode_on_device true decodes the JPEGs of a prepared folder read from disk; "
                             f"{args.dataset_name} is not a prepared folder of JPEGs (scripts/prepare_data.py "
                             "--encoding jpeg).")
    from .streaming import DeviceJPEGDecoder

    return DeviceJPEGDecoder(num_channels, device)


def suggested_prepare_command(args: DataArguments, image_size: int) -> str:
    """The prepare_data.py command for this data, at the short side a model of `image_size` wants (256 for 224)."""
    name = args.dataset_name.rstrip("/")
    output = f"{name}_prepared" if args.train_dir or "/" not in name or name.startswith((".", "/", "~")) \
        else f"prepared/{name.replace('/', '_')}"
    short_side = max(image_size, round(image_size / 0.875))
    return f"python scripts/prepare_data.py {args.command_flags()} --short_side {short_side} --output_dir {output}"


class _Split:
    """One selected split on its way to `ImageData`: its reader, labels and description; `positions` are the rows of
    `dataset` still kept (bad images are left out along the way)."""

    def __init__(self, dataset, name: str, key: str, reader, labels, prepared_skipped=()):
        self.dataset, self.name, self.key, self.reader, self.labels = dataset, name, key, reader, labels
        self.skipped = list(prepared_skipped)
        self.positions = np.arange(len(dataset))

    def describe(self, index: int) -> str:
        return f"row {source_rows(self.dataset, [self.positions[index]])[0]}{self.reader.describe(index)}"

    def estimated_canvas(self, channels: int) -> tuple[int, int, int]:
        """The canvas (exact for prepared data; from a sample of headers otherwise)."""
        indices = np.arange(len(self.reader))
        if not self.reader.stored and len(indices) > HEADER_SAMPLE:
            indices = np.sort(np.random.default_rng(0).choice(indices, HEADER_SAMPLE, replace=False))
        sizes, problems = header_sizes(self.reader, indices, workers=0)
        good = sizes[np.setdiff1d(np.arange(len(indices)), np.asarray(sorted(problems), dtype=np.int64))]
        if not len(good):
            return channels, 1, 1
        return channels, int(good[:, 0].max()), int(good[:, 1].max())

    def leave_out(self, problems: dict, skip_bad_images: bool) -> np.ndarray:
        """{index: why} of images that cannot be decoded: an error naming the first, or (--skip_bad_images) they are
        listed and left out of the reader, labels and positions. Returns the indices kept."""
        kept = np.arange(len(self.reader))
        if not problems:
            return kept
        bad = sorted(problems)
        described = [self.describe(index) for index in bad[:1000]]
        if not skip_bad_images:
            raise ValueError(
                f"Split {self.name!r}: {len(bad)} of {len(self.dataset)} images cannot be decoded; the first is "
                f"{described[0]}: {problems[bad[0]]}. Fix or remove them, or pass --skip_bad_images true to leave "
                "them out (they are then counted and listed in the results).")
        described += [f"row {row}" for row in source_rows(self.dataset, self.positions[bad[1000:]])]
        print(f"[data] split {self.name!r}: skipped {len(bad)} image(s) that cannot be decoded (--skip_bad_images):"
              f" {', '.join(described[:5])}{', ...' if len(bad) > 5 else ''}", flush=True)
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


def _selected_splits(args: DataArguments, image_size: int, num_channels: int, require_labels: bool, token):
    """The two `_Split`s, their geometry and class names; all checks that need no decoding."""
    raw = load_raw_dataset(args, token=token)
    train, evaluation, names, keys = select_splits(raw, args)
    if 0 < len(evaluation) < MIN_EVAL_IMAGES:
        print(f"warning: the evaluation split ({names[1]}) has only {len(evaluation)} image(s): one image moves its "
              f"accuracy by {100 / len(evaluation):.0f} points, so its numbers mean little. Evaluate on more images "
              "(a larger --train_val_split, --max_eval_samples, or an evaluation split).", file=sys.stderr, flush=True)
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError(f"Empty split: {len(train)} training and {len(evaluation)} evaluation images.")
    prepared = args.train_dir is None and is_prepared(args.dataset_name)
    image_column = "image" if prepared else find_column(train, "image", args.image_column_name)
    label_column = find_column(train, "label", args.label_column_name, required=require_labels)
    for column in (image_column, label_column):
        if column is not None and column not in evaluation.column_names:
            raise ValueError(f"The evaluation split ({names[1]}) has no column {column!r}; its columns: "
                             f"{list(evaluation.column_names)}.")
    class_names, unseen = check_labels(train, evaluation, label_column, names, allow_unlabelled=not require_labels)
    if prepared:
        manifest = read_manifest(args.dataset_name)
        geometry = Geometry(**{**geometry_of(manifest).__dict__, "num_channels": num_channels})
        if geometry.short_side < image_size:
            print(f"warning: {args.dataset_name} was prepared with short side {geometry.short_side}, below the model's "
                  f"{image_size} px: every image is scaled up (blurred). Prepare it again with --short_side "
                  f"{round(image_size / 0.875)} for this model.", file=sys.stderr, flush=True)
    else:
        geometry = Geometry.for_short_side(image_size, num_channels)
    splits = []
    for dataset, name, key in zip((train, evaluation), names, keys):
        labels = None
        if label_column is not None:
            values = label_values(dataset, label_column)
            if unseen and dataset is evaluation:
                values = np.where(np.isin(values, sorted(unseen)), -1, values)
            labels = torch.as_tensor(values, dtype=torch.long)
        if prepared:
            reader = prepared_reader(args.dataset_name, key, dataset, num_channels)
            skipped = [entry for shard in manifest["splits"][key]["shards"] for entry in shard["skipped"]]
            splits.append(_Split(dataset, name, key, reader, labels, skipped))
        else:
            reader = DatasetReader(as_undecoded_images(dataset, image_column), image_column, geometry)
            splits.append(_Split(dataset, name, key, reader, labels))
    return splits, geometry, class_names, prepared


def load_image_splits(args: DataArguments, image_size: int, num_channels: int = 3, require_labels: bool = False,
                      token: str | None = None, num_workers: int | None = None, first: int | None = None
                      ) -> tuple[ImageData, ImageData]:
    """Train and eval splits as `ImageData`, decoded in memory or streamed from disk as --data_in_memory and the
    memory budget say (one decision for all processes of a run, printed). `num_workers`: DataLoader workers of a
    streamed split (None: this process's share of the CPUs). `first`: only the first N images of each split are
    wanted (pictures): they are decoded, nothing else. Every bad flag and input fails here, before any training
    starts."""
    splits, geometry, class_names, prepared = _selected_splits(args, image_size, num_channels, require_labels, token)
    if first is not None:
        for split in splits:
            split.keep(np.arange(min(first, len(split.reader))))
        return tuple(_image_data(split, geometry, class_names, True, 0, 0, args.skip_bad_images) for split in splits)
    canvases = [split.estimated_canvas(num_channels) for split in splits]
    decoded = sum(len(split.dataset) * int(np.prod(canvas)) for split, canvas in zip(splits, canvases))
    budget, explained = memory_budget()
    fits = decoded <= budget
    if args.data_in_memory == "auto":
        in_memory = all_processes_agree(fits)
    else:
        in_memory = args.data_in_memory == "true"
    source = f"prepared folder {args.dataset_name}" if prepared else args.dataset_name
    size = f"{'' if prepared else 'about '}{gigabytes(decoded)} decoded"
    if in_memory:
        why = ("--data_in_memory true" + ("" if fits else f", although over the budget of {gigabytes(budget)}")
               if args.data_in_memory == "true" else f"fits the budget of {gigabytes(budget)} = {explained}")
        print(f"[data] in memory: {len(splits[0].dataset):,} + {len(splits[1].dataset):,} images of {source} "
              f"({size}; {why})", flush=True)
    elif not prepared and args.data_in_memory == "auto":
        raise ValueError(
            f"The images of {args.dataset_name} take {size}, more than this process may hold in memory "
            f"({gigabytes(budget)} = {explained}). Prepare them once (scaled, stored for fast reading) and train "
            f"from the prepared folder: {suggested_prepare_command(args, image_size)}, then pass that --output_dir "
            "as --dataset_name. (--data_in_memory false reads them from the source instead, decoding and scaling "
            "every image in every epoch.)")
    workers = default_workers() if num_workers is None else num_workers
    if not in_memory:
        why = "--data_in_memory false" if args.data_in_memory == "false" else \
            f"over the memory budget of {gigabytes(budget)} = {explained}"
        print(f"[data] from disk: {len(splits[0].dataset):,} + {len(splits[1].dataset):,} images of {source}, read by "
              f"{workers} DataLoader worker(s) per process ({size}; {why})", flush=True)
        if not prepared:
            print("note: the images are decoded and scaled from the source in every epoch; preparing them once is "
                  f"faster: {suggested_prepare_command(args, image_size)}", file=sys.stderr, flush=True)
    decode_workers = args.preprocessing_num_workers
    if decode_workers is None:
        decode_workers = min(8, cpus_per_process()) if max(len(s.dataset) for s in splits) > 2048 else 0
    return tuple(_image_data(split, geometry, class_names, in_memory, workers, decode_workers, args.skip_bad_images)
                 for split in splits)


def _image_data(split: _Split, geometry: Geometry, class_names, in_memory: bool, workers: int, decode_workers: int,
                skip_bad_images: bool) -> ImageData:
    sizes, problems = header_sizes(split.reader, np.arange(len(split.reader)), decode_workers,
                                   progress=f"Reading headers ({split.name})")
    sizes = sizes[split.leave_out(problems, skip_bad_images)]
    if not in_memory:
        canvas = (geometry.num_channels, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
        return StreamedImages(split.reader, sizes, canvas, split.labels, class_names, split.name, split.skipped,
                              geometry.short_side, workers)
    images, decoded, problems, storage = decode_into_memory(
        split.reader, np.arange(len(sizes)), sizes, geometry.num_channels, decode_workers,
        progress=f"Decoding images ({split.name})")
    if problems:  # a header that reads, pixels that do not (a truncated file)
        images, decoded, storage = keep_rows(images, decoded, split.leave_out(problems, skip_bad_images), storage)
    return InMemoryImages(images, decoded, split.labels, class_names, split.name, split.skipped, geometry.short_side,
                          **storage)
