"""A split read from disk batch by batch (`StreamedImages`): DataLoader worker processes read and decode the
images of each batch onto fixed canvases in shared memory (no randomness: crops happen on the training device), so
that memory stays flat however many images there are. Also the loader settings such a split needs (workers,
persistent workers, prefetch) and a check that /dev/shm holds the batches in flight."""

import math
import os
import sys

import numpy as np
import torch

from .decode import BadImage, paste
from .memory import cpus_per_process
from .splits import ImageData

MAX_WORKERS = 16


def empty_canvases(count: int, canvas: tuple[int, int, int]) -> torch.Tensor:
    """uint8 `(count, *canvas)`; in a DataLoader worker allocated in shared memory, which is where the batch goes
    anyway (the DataLoader would otherwise copy it there)."""
    shape = (count, *canvas)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))  # as torch's own default_collate does
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    except (AttributeError, RuntimeError):
        return torch.empty(shape, dtype=torch.uint8).share_memory_()


class StreamedImages(ImageData):
    """Images read through `reader` (readers.py) when asked for: `positions` of the reader, their stored `sizes`.
    Repeated positions in one batch (repeated augmentation) are decoded once."""

    def __init__(self, reader, sizes: np.ndarray, canvas, labels=None, class_names=None, split: str = "",
                 skipped=(), short_side: int = 0, num_workers: int = 0):
        super().__init__(labels, class_names, split, skipped, canvas, short_side)
        self.reader, self.sizes, self.num_workers = reader, np.asarray(sizes, dtype=np.int32), num_workers

    def __len__(self):
        return len(self.reader)

    def read(self, positions):
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(positions, return_inverse=True)
        images = empty_canvases(len(positions), self.canvas)
        canvases = images.numpy()
        sizes = np.zeros((len(positions), 2), dtype=np.int32)
        first = {}
        for position, pixels in zip(unique.tolist(), self.reader.read(unique)):
            if isinstance(pixels, BadImage):
                raise BadImage(f"{self.split}: the image at position {position}{self.reader.describe(position)} "
                               f"cannot be decoded: {pixels}. Prepare the data with scripts/prepare_data.py "
                               "--skip_bad_images true, which checks every image once and leaves bad ones out.")
            first[position] = pixels
        for index, position in enumerate(unique[inverse].tolist()):
            sizes[index] = paste(canvases[index], first[position])
        return images, torch.from_numpy(sizes)

    def subset(self, positions) -> "StreamedImages":
        positions = np.asarray(positions, dtype=np.int64)
        return StreamedImages(self.reader.subset(positions), self.sizes[positions], self.canvas,
                              None if self.labels is None else self.labels[torch.as_tensor(positions)],
                              self.class_names, self.split, self.skipped, self.short_side, self.num_workers)


def default_workers() -> int:
    """DataLoader workers for a streamed split: this process's share of the CPUs, one left for the main process."""
    return max(1, min(MAX_WORKERS, cpus_per_process() - 1))


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def fit_workers_to_shared_memory(workers: int, prefetch: int, batch_bytes: int, chosen: bool,
                                 free: int | None = None) -> tuple[int, int]:
    """(workers, prefetch factor) whose batches in flight (workers x prefetch, each `batch_bytes` in /dev/shm, plus
    one being handed over) fit in a third of the free shared memory — containers often have only 64 MB of it,
    and a full /dev/shm kills a worker with a bus error. Settings the user `chosen` are kept or refused with what
    to change; automatic ones are lowered."""
    free = shared_memory_free() if free is None else free
    if free is None or workers == 0:
        return workers, prefetch
    room = free // 3
    need = lambda w, p: (w * p + 1) * batch_bytes  # noqa: E731
    if need(workers, prefetch) <= room:
        return workers, prefetch
    advice = (f"/dev/shm has {free / 2**20:,.0f} MB free; {workers} DataLoader worker(s) x {prefetch} prefetched "
              f"batch(es) of {batch_bytes / 2**20:,.0f} MB need {need(workers, prefetch) / 2**20:,.0f} MB (a third of "
              "it is used at most). Give the container more shared memory (docker run --shm-size 16g), or lower "
              "--dataloader_num_workers, --dataloader_prefetch_factor or the batch size.")
    if chosen:
        raise ValueError(advice)
    while workers > 1 and need(workers, prefetch) > room:
        workers -= 1
    if need(workers, prefetch) > room:
        prefetch = 1
    if need(workers, prefetch) > room:
        raise ValueError(advice)
    print(f"warning: {advice} Using {workers} worker(s) x {prefetch} prefetched batch(es) instead.",
          file=sys.stderr, flush=True)
    return workers, prefetch
