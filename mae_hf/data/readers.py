"""Random access to one split's stored images, by position: from a `datasets` split of undecoded images (decoded
and scaled to the geometry on reading), or from the shards of a prepared folder (stored at their final size).

Readers are made in the main process and forked into DataLoader workers: they hold no open file or memory map
when copied, and open what they read lazily in each process.
"""

import os

import numpy as np

from .decode import BadImage, Geometry, decode_image, decode_stored, stored_size

REMAP_BYTES = 64 * 2**20  # a worker drops its shard mappings after reading this much (see PreparedReader)


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

    Shards are memory-mapped when first read. A mapped page that was read stays in the process's resident (and
    proportional) memory until the mapping goes, so a reader drops its mappings after every `REMAP_BYTES` read:
    an epoch over a data set of any size then keeps the workers' memory flat (the kernel's page cache still
    serves the pages)."""

    stored = True

    def __init__(self, files: list[str], counts: list[int], rows: np.ndarray, sizes: np.ndarray, encoding: str,
                 num_channels: int):
        self.files, self.rows, self.stored_sizes = list(files), np.asarray(rows, dtype=np.int64), sizes
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.encoding, self.num_channels = encoding, num_channels
        self._tables, self._bytes_read, self._pid = {}, 0, None

    def __getstate__(self):
        return {**self.__dict__, "_tables": {}, "_bytes_read": 0}

    def __len__(self):
        return len(self.rows)

    def subset(self, positions) -> "PreparedReader":
        positions = np.asarray(positions, dtype=np.int64)
        return PreparedReader(self.files, np.diff(self.starts), self.rows[positions], self.stored_sizes[positions],
                              self.encoding, self.num_channels)

    def _table(self, shard: int):
        import pyarrow as pa

        if self._pid != os.getpid() or self._bytes_read > REMAP_BYTES:  # a forked copy, or time to let pages go
            self._tables, self._bytes_read, self._pid = {}, 0, os.getpid()
        if shard not in self._tables:
            with pa.memory_map(self.files[shard]) as source:
                self._tables[shard] = pa.ipc.open_stream(source).read_all().column("image")
        return self._tables[shard]

    def values(self, positions) -> list:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        shards = np.searchsorted(self.starts, rows, side="right") - 1
        values = []
        for row, shard in zip(rows.tolist(), shards.tolist()):
            data = self._table(shard)[row - int(self.starts[shard])].as_py()
            self._bytes_read += len(data)
            values.append(data)
        return values

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
