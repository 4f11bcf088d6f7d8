"""Random access to one split's stored images, by position: from a `datasets` split of undecoded images (decoded
and scaled to the geometry on reading), or from the shards of a prepared folder (stored at their final size).

Readers are made in the main process and forked into DataLoader workers: each process opens the files it reads
itself, lazily.
"""

import os

import numpy as np

from .decode import BadImage, Geometry, decode_image, decode_stored, stored_size
from .prepared import IMAGE_COLUMN, read_manifest, split_files
from .sources import source_rows


class DatasetReader:
    """Undecoded images ({bytes, path}) of a `datasets` split, by position among `positions` of that split (default:
    all); each is decoded and scaled to `geometry` when read."""

    stored = False  # sizes are known only from the images' headers

    def __init__(self, dataset, column: str, geometry: Geometry, positions: np.ndarray | None = None):
        self.dataset, self.column, self.geometry = dataset.select_columns([column]), column, geometry
        self.positions = np.arange(len(dataset), dtype=np.int64) if positions is None else positions

    def __len__(self):
        return len(self.positions)

    def subset(self, positions) -> "DatasetReader":
        subset = DatasetReader.__new__(DatasetReader)
        subset.__dict__.update(self.__dict__, positions=self.positions[np.asarray(positions, dtype=np.int64)])
        return subset

    def values(self, positions) -> list:
        return self.dataset[self.positions[np.asarray(positions, dtype=np.int64)].tolist()][self.column]

    def sizes(self, positions) -> tuple[np.ndarray, dict]:
        """(n, 2) stored heights and widths from the images' headers, and {index in `positions`: why unreadable}."""
        sizes, problems = np.zeros((len(positions), 2), dtype=np.int32), {}
        for index, value in enumerate(self.values(positions)):
            try:
                sizes[index] = stored_size(value, self.geometry)
            except BadImage as error:
                problems[index] = str(error)
        return sizes, problems

    def read(self, positions) -> list:
        """Pictures (decode.py: PIL images or uint8 (C, h, w) arrays), or the `BadImage` of an image that cannot be
        decoded."""
        decoded = []
        for value in self.values(positions):
            try:
                decoded.append(decode_image(value, self.geometry))
            except BadImage as error:
                decoded.append(error)
        return decoded

    def describe(self, position: int) -> str:
        value = self.values([position])[0]
        return f" ({value['path']})" if isinstance(value, dict) and value.get("path") else ""


class PreparedReader:
    """Images of a prepared split (scripts/prepare_data.py), by position in the selected rows: `rows` are row
    numbers of the split's shards in order, `files`/`counts` the shards and their row counts, `sizes` the stored
    heights and widths of the selected rows.

    Each image's bytes are read with one `pread` at the place its shard holds them (`value_index`, found once from
    the shards' Arrow metadata), not through a memory map: a mapped page stays in the reading process's resident
    memory, and the kernel maps neighbouring pages too (fault-around), so a worker reading at random through maps
    would grow by several times what it reads, up to the whole data set. Read this way, the workers' memory stays
    flat however large the data set is; the kernel's page cache still keeps what was read."""

    stored = True
    OPEN_FILES = 64  # shard files a process keeps open (a million images are ~600 shards; file handles are few)

    def __init__(self, files: list[str], counts: list[int], rows: np.ndarray, sizes: np.ndarray, encoding: str,
                 num_channels: int, value_offsets: np.ndarray | None = None,
                 value_lengths: np.ndarray | None = None):
        self.files, self.rows, self.stored_sizes = list(files), np.asarray(rows, dtype=np.int64), sizes
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.encoding, self.num_channels = encoding, num_channels
        if value_offsets is None:  # the byte ranges of the selected rows' images in their shard files
            value_offsets, value_lengths = (array[self.rows] for array in value_index(self.files))
        self.value_offsets, self.value_lengths = value_offsets, value_lengths
        self._handles, self._pid = {}, None

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def __len__(self):
        return len(self.rows)

    def subset(self, positions) -> "PreparedReader":
        positions = np.asarray(positions, dtype=np.int64)
        return PreparedReader(self.files, np.diff(self.starts), self.rows[positions], self.stored_sizes[positions],
                              self.encoding, self.num_channels, self.value_offsets[positions],
                              self.value_lengths[positions])

    def _handle(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked copy: its parent's file positions are not its own
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            if len(self._handles) >= self.OPEN_FILES:
                os.close(self._handles.pop(next(iter(self._handles))))
            self._handles[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._handles[shard]

    def values(self, positions) -> list:
        """The stored bytes of the images at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.searchsorted(self.starts, self.rows[positions], side="right") - 1
        return [os.pread(self._handle(shard), length, offset) for shard, offset, length in
                zip(shards.tolist(), self.value_offsets[positions].tolist(), self.value_lengths[positions].tolist())]

    def sizes(self, positions) -> tuple[np.ndarray, dict]:
        return self.stored_sizes[np.asarray(positions, dtype=np.int64)], {}

    def read(self, positions) -> list:
        """Pictures (decode.py: PIL images or uint8 (C, h, w) arrays), or the `BadImage` of an image that cannot be
        decoded."""
        decoded = []
        sizes = self.stored_sizes[np.asarray(positions, dtype=np.int64)].tolist()
        for data, (height, width) in zip(self.values(positions), sizes):
            try:
                decoded.append(decode_stored(data, height, width, self.encoding, self.num_channels))
            except BadImage as error:
                decoded.append(error)
        return decoded

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


def prepared_reader(folder: str, split: str, selected, num_channels: int) -> PreparedReader:
    """A `PreparedReader` over the rows `selected` (a selection of the prepared split) for a model with
    `num_channels`."""
    manifest = read_manifest(folder)
    files, counts = split_files(folder, manifest, split)
    table = selected.select_columns(["height", "width"]).with_format("numpy")[:]
    sizes = np.stack([table["height"], table["width"]], axis=1).astype(np.int32)
    return PreparedReader(files, counts, source_rows(selected), sizes, manifest["settings"]["encoding"],
                          num_channels)
