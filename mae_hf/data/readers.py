"""The two interfaces every kind of image source is read through, `ImageSource` (one data set) and `ImageReader`
(random access to one split's stored images); their `datasets` and prepared-folder kinds; `open_source` picks one.

A new kind of source is one `ImageSource` and one `ImageReader` here, and a line in `open_source`. Its `raw` is a
`DatasetDict` of the rows its reader reads (for files `datasets` cannot load, a listing such as
`sources.list_image_folder` makes). Readers are forked into DataLoader workers: each process opens its files lazily.
"""

import copy
import functools
import os
import sys
from typing import Protocol

import numpy as np

from ..cli import print_once
from .arguments import SourceArguments
from .decode import BadImage, Geometry, decode_image, decode_stored, stored_size
from .prepared import IMAGE_COLUMN, is_prepared, load_prepared, prepare_command, read_manifest, split_files
from .sources import as_undecoded_images, find_column, load_raw_dataset, source_folders, source_rows
from .transforms import stored_short_side


class ImageReader(Protocol):
    """Random access to one split's stored images, by position (what memory.py and streaming.py read through)."""

    stored: bool  # sizes are known without reading the images (a prepared folder's), not only from their headers
    encoding: str | None  # how `values` are stored: "jpeg" / "raw" (a prepared folder), None (undecoded images)

    def __len__(self) -> int: ...

    def subset(self, positions) -> "ImageReader":
        """The images at `positions` only."""

    def values(self, positions) -> list:
        """The stored (undecoded) values of the images at `positions`."""

    def sizes(self, positions) -> tuple[np.ndarray, dict]:
        """(n, 2) stored heights and widths, and {index in `positions`: why unreadable}."""

    def read(self, positions) -> list:
        """Pictures (decode.py: PIL images or uint8 (C, h, w) arrays), or the `BadImage` of one that cannot decode."""

    def describe(self, position: int) -> str:
        """Where the image at `position` lies (" (path)"), for messages; "" if nothing more is known."""


def _subset(reader, positions, *indexed: str):
    """A copy of `reader` whose arrays named `indexed` keep only the rows at `positions` (file handles: its own)."""
    positions = np.asarray(positions, dtype=np.int64)
    subset = copy.copy(reader)  # through __getstate__, where a reader has one
    subset.__dict__.update({name: getattr(reader, name)[positions] for name in indexed})
    return subset


def _each_or_bad(function, values) -> list:
    """`function(value)` for each value, or the `BadImage` it raised."""
    results = []
    for value in values:
        try:
            results.append(function(value))
        except BadImage as error:
            results.append(error)
    return results


class DatasetReader:
    """Undecoded images ({bytes, path}) of a `datasets` split, by position in `positions`, decoded to `geometry`."""

    stored, encoding = False, None  # sizes are known only from the images' headers

    def __init__(self, dataset, column: str, geometry: Geometry):
        self.dataset, self.column, self.geometry = dataset.select_columns([column]), column, geometry
        self.positions = np.arange(len(dataset), dtype=np.int64)

    def __len__(self):
        return len(self.positions)

    def subset(self, positions) -> "DatasetReader":
        return _subset(self, positions, "positions")

    def values(self, positions) -> list:
        return self.dataset[self.positions[np.asarray(positions, dtype=np.int64)].tolist()][self.column]

    def sizes(self, positions) -> tuple[np.ndarray, dict]:
        found = _each_or_bad(lambda value: stored_size(value, self.geometry), self.values(positions))
        problems = {index: str(size) for index, size in enumerate(found) if isinstance(size, BadImage)}
        sizes = [(0, 0) if isinstance(size, BadImage) else size for size in found]
        return np.array(sizes, dtype=np.int32).reshape(-1, 2), problems

    def read(self, positions) -> list:
        return _each_or_bad(lambda value: decode_image(value, self.geometry), self.values(positions))

    def describe(self, position: int) -> str:
        value = self.values([position])[0]
        return f" ({value['path']})" if isinstance(value, dict) and value.get("path") else ""


class PreparedReader:
    """Images of a prepared split, by position in the selected `rows` (row numbers in the shards `files`, of `counts`
    rows each), stored at `sizes`. Each is one `pread` at its place in its shard (`value_index`), not read through a
    memory map, whose pages would stay resident in the worker (docs/data.md, "Reading it")."""

    stored = True
    OPEN_FILES = 64  # shard files a process keeps open (a million images are ~600 shards; file handles are few)

    def __init__(self, files: list[str], counts: list[int], rows: np.ndarray, sizes: np.ndarray, encoding: str,
                 num_channels: int):
        self.files, self.rows, self.stored_sizes = list(files), np.asarray(rows, dtype=np.int64), sizes
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.encoding, self.num_channels = encoding, num_channels
        # the byte ranges of the selected rows' images in their shard files
        self.value_offsets, self.value_lengths = (array[self.rows] for array in value_index(self.files))
        self._handles, self._pid = {}, None

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def __len__(self):
        return len(self.rows)

    def subset(self, positions) -> "PreparedReader":
        return _subset(self, positions, "rows", "stored_sizes", "value_offsets", "value_lengths")

    def _handle(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked copy: its parent's file positions are not its own
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            if len(self._handles) >= self.OPEN_FILES:
                os.close(self._handles.pop(next(iter(self._handles))))
            self._handles[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._handles[shard]

    def values(self, positions) -> list:
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.searchsorted(self.starts, self.rows[positions], side="right") - 1
        return [os.pread(self._handle(shard), length, offset) for shard, offset, length in
                zip(shards.tolist(), self.value_offsets[positions].tolist(), self.value_lengths[positions].tolist())]

    def sizes(self, positions) -> tuple[np.ndarray, dict]:
        return self.stored_sizes[np.asarray(positions, dtype=np.int64)], {}

    def read(self, positions) -> list:
        sizes = self.stored_sizes[np.asarray(positions, dtype=np.int64)].tolist()
        return _each_or_bad(lambda item: decode_stored(item[0], *item[1], self.encoding, self.num_channels),
                            zip(self.values(positions), sizes))

    def describe(self, position: int) -> str:
        row = int(self.rows[position])
        shard = int(np.searchsorted(self.starts, row, side="right") - 1)
        return f" ({self.files[shard]}, row {row - int(self.starts[shard])})"


def value_index(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets, byte lengths) of every row's image in the shard files (all rows, in order): from each record
    batch's offsets buffer and where its data buffer lies in the file (mapped only to read the metadata)."""
    import pyarrow as pa

    offsets, lengths = [], []
    for path in files:
        with pa.memory_map(path) as source:
            base = source.read_buffer(1).address  # the map's first byte: buffer addresses - base = file offsets
            source.seek(0)
            for batch in pa.ipc.open_stream(source):
                column = batch.column(IMAGE_COLUMN)
                kind = np.int64 if pa.types.is_large_binary(column.type) else np.int32
                _, value_offsets, data = column.buffers()
                ends = np.frombuffer(value_offsets, dtype=kind)[column.offset:column.offset + len(column) + 1]
                offsets.append(data.address - base + ends[:-1].astype(np.int64))
                lengths.append(np.diff(ends).astype(np.int64))
    return np.concatenate(offsets), np.concatenate(lengths)


# ---- sources ----------------------------------------------------------------------------------------------------

class ImageSource:
    """One data set as the scripts read it: its splits (`raw`, loaded when first asked for), image and label columns,
    the geometry its images are stored in, a reader per selected split, the images left out before it was read, and
    what identifies its content beyond its flags (recorded with a run)."""

    stored = False  # images stored at their final size (exact sizes, checked once): no note on decoding every epoch

    def __init__(self, args: SourceArguments, token: str | None = None):
        self.args, self.token = args, token

    @functools.cached_property
    def raw(self):
        return load_raw_dataset(self.args, token=self.token)

    @property
    def description(self) -> str:
        """The data as the [data] line names it."""
        args = self.args
        return f"{args.train_dir} and {args.validation_dir}" if args.validation_dir else args.dataset_name

    @property
    def validation_dir(self) -> str | None:
        """The folder the evaluation images were listed from, if any."""
        return self.args.validation_dir

    def source_rows(self, key: str) -> tuple[int, np.ndarray]:
        """(rows of the source split `key`, the source row of each row of `raw[key]`, ascending)."""
        return len(self.raw[key]), np.arange(len(self.raw[key]))

    def columns(self, train, evaluation, require_labels: bool) -> tuple[str, str | None]:
        """(image column, label column or None) of the selected splits."""
        raise NotImplementedError

    def geometry(self, image_size: int, num_channels: int) -> Geometry:
        raise NotImplementedError

    def reader(self, dataset, key: str, image_column: str, geometry: Geometry) -> ImageReader:
        """An `ImageReader` of `dataset`, the rows selected from split `key`."""
        raise NotImplementedError

    def skipped(self, key: str, rows: np.ndarray) -> list[str]:
        """The images among the source rows `rows` of split `key` left out before this run (when preparing)."""
        return []

    def identity(self) -> dict:
        """What pins the images' content beyond the data flags, for the run's settings (a resume compares it)."""
        return {}


class DatasetSource(ImageSource):
    """A Hub id, a local dataset folder or file, or image folders: read by `datasets` (or listed), decoded as read."""

    def columns(self, train, evaluation, require_labels: bool) -> tuple[str, str | None]:
        return (find_column(train, "image", self.args.image_column_name),
                find_column(train, "label", self.args.label_column_name, required=require_labels))

    def geometry(self, image_size: int, num_channels: int) -> Geometry:
        return Geometry.for_short_side(stored_short_side(image_size), num_channels)

    def reader(self, dataset, key: str, image_column: str, geometry: Geometry) -> DatasetReader:
        return DatasetReader(as_undecoded_images(dataset, image_column), image_column, geometry)

    def identity(self) -> dict:
        # A Hub id's commit (`hub_snapshot` sets it when the data is loaded); a local path is identified by its flags.
        return {} if source_folders(self.args) else {"dataset_revision": self.args.dataset_revision}


class PreparedSource(ImageSource):
    """A folder made by scripts/prepare_data.py: images already decoded, scaled and checked, read from its shards."""

    stored = True

    @functools.cached_property
    def raw(self):
        return load_prepared(self.args.dataset_name)

    @functools.cached_property
    def manifest(self) -> dict:
        return read_manifest(self.args.dataset_name)

    @functools.cached_property
    def stored_rows(self) -> dict:
        """{split: the source row of each stored row} (ascending: shards hold their rows in source order)."""
        return {key: split.select_columns(["source_row"]).with_format("numpy")[:]["source_row"]
                for key, split in self.raw.items()}

    @property
    def description(self) -> str:
        return f"prepared folder {self.args.dataset_name}"

    @property
    def validation_dir(self) -> str | None:
        return self.args.validation_dir or self.manifest["identity"]["source"].get("validation_dir")

    def source_rows(self, key: str) -> tuple[int, np.ndarray]:
        return self.manifest["splits"][key]["num_source_images"], self.stored_rows[key]

    def columns(self, train, evaluation, require_labels: bool) -> tuple[str, str | None]:
        """A prepared folder's labels are in its column `label` (whatever the source called it), if it has any."""
        args = self.args
        asked, source_name = args.label_column_name, self.manifest["identity"]["source"].get("label_column_name")
        if asked not in (None, "label", source_name):
            raise ValueError(f"--label_column_name {asked}: {args.dataset_name} is a prepared folder, whose labels are "
                             "its column 'label' (the source's label column, renamed). Leave the flag out.")
        if "label" in train.column_names:
            return IMAGE_COLUMN, "label"
        if require_labels:
            raise ValueError(f"{args.dataset_name} was prepared without labels (its source had no label column), and "
                             "this script needs labels. Prepare it again from a labelled source (--label_column_name "
                             "when preparing names the column).")
        return IMAGE_COLUMN, None

    def geometry(self, image_size: int, num_channels: int) -> Geometry:
        """The folder's geometry, read at the model's channel count; said when the folder does not suit the model."""
        folder, settings = self.args.dataset_name, self.manifest["settings"]
        geometry = Geometry(settings["short_side"], settings["max_long_side"], num_channels)
        stored_channels = settings["num_channels"]
        if self.manifest.get("fingerprint") is None:
            print_once(f"note: {folder} was prepared by an earlier mae_hf, without fingerprints: its shards are "
                       "checked by their sizes only, and a resume cannot tell whether it was prepared again.")
        if geometry.short_side < image_size:
            print_once(f"warning: {folder} was prepared with short side {geometry.short_side}, below the model's "
                       f"{image_size} px: every image is scaled up (blurred). Prepare it again with --short_side "
                       f"{stored_short_side(image_size)} for this model.", file=sys.stderr)
        if stored_channels != num_channels:
            print_once(f"warning: {folder} holds {'RGB' if stored_channels == 3 else 'grey'} images and the model "
                       f"takes {num_channels} channel(s): each image is converted when read.", file=sys.stderr)
        return geometry

    def reader(self, dataset, key: str, image_column: str, geometry: Geometry) -> PreparedReader:
        files, counts = split_files(self.args.dataset_name, self.manifest, key)
        table = dataset.select_columns(["height", "width"]).with_format("numpy")[:]
        sizes = np.stack([table["height"], table["width"]], axis=1).astype(np.int32)
        return PreparedReader(files, counts, source_rows(dataset), sizes, self.manifest["settings"]["encoding"],
                              geometry.num_channels)

    def skipped(self, key: str, rows: np.ndarray) -> list[str]:
        """The shards' `skipped` entries belong, in order, to the source rows that no shard stores."""
        split = self.manifest["splits"][key]
        entries = [entry for shard in split["shards"] for entry in shard["skipped"]]
        missing = np.setdiff1d(np.arange(split["num_source_images"]), self.stored_rows[key])
        if len(missing) != len(entries):
            folder = self.args.dataset_name
            raise ValueError(f"{folder}: split {key!r} lists {len(entries)} skipped image(s) in its manifest, but "
                             f"{len(missing)} of its {split['num_source_images']} source rows are not stored: the "
                             f"folder was edited or damaged. Copy {folder} again from where it came, or prepare it "
                             f"again: {prepare_command(self.manifest, folder, overwrite=True)}")
        return [entry for entry, chosen in zip(entries, np.isin(missing, rows).tolist()) if chosen]

    def identity(self) -> dict:
        # what the folder holds, not only where: a folder prepared again (other images, another size) is a change
        return {"prepared_fingerprint": self.manifest.get("fingerprint")}


def open_source(args: SourceArguments, token: str | None = None) -> ImageSource:
    """The `ImageSource` the data flags name (nothing is read yet): the one place that tells the kinds apart."""
    prepared = args.train_dir is None and is_prepared(args.dataset_name)
    return (PreparedSource if prepared else DatasetSource)(args, token)
