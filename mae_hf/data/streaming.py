"""A split read from disk batch by batch (`StreamedImages`): DataLoader workers decode each batch onto canvases in
shared memory (no randomness: crops happen on the training device), so memory stays flat however many images there
are. Also the workers such a split gets, and a check that /dev/shm holds the batches in flight."""

import math
import os
import sys

import numpy as np
import torch

from ..cli import print_once
from .decode import BadImage, paste
from .memory import cpus_per_process, repeat_edges
from .policy import processes_on_this_machine
from .splits import ImageData

MAX_WORKERS = 16


def empty_canvases(count: int, canvas: tuple[int, int, int]) -> torch.Tensor:
    """uint8 `(count, *canvas)`; in a DataLoader worker in shared memory, where the DataLoader would copy it anyway."""
    shape = (count, *canvas)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))  # as torch's own default_collate does
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    except (AttributeError, RuntimeError):
        return torch.empty(shape, dtype=torch.uint8).share_memory_()


class StreamedImages(ImageData):
    """Images read through `reader` (readers.py) when asked for, with their stored `sizes`; an image repeated in a
    batch is decoded once. `read_encoded`: a prepared folder's JPEG bytes instead, for `DeviceJPEGDecoder`."""

    def __init__(self, reader, sizes: np.ndarray, canvas, labels=None, class_names=None, split: str = "",
                 skipped=(), short_side: int = 0, num_workers: int = 0):
        super().__init__(labels, class_names, split, skipped, canvas, short_side)
        self.reader, self.sizes, self.num_workers = reader, np.asarray(sizes, dtype=np.int32), num_workers

    def __len__(self):
        return len(self.reader)

    def read(self, positions):
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        unique = np.unique(positions)
        images = empty_canvases(len(positions), self.canvas)
        canvases = images.numpy()
        sizes = np.zeros((len(positions), 2), dtype=np.int32)
        rows = {}  # position -> the row where it was pasted first
        pictures = dict(zip(unique.tolist(), self.reader.read(unique)))
        for index, position in enumerate(positions.tolist()):
            if position in rows:  # the same image again (repeated augmentation): a copy of its canvas
                canvases[index], sizes[index] = canvases[rows[position]], sizes[rows[position]]
                continue
            picture = pictures[position]
            if isinstance(picture, BadImage):
                raise BadImage(f"{self.split}: the image at position {position}{self.reader.describe(position)} "
                               f"cannot be decoded: {picture}. Prepare the data with scripts/prepare_data.py "
                               "--skip_bad_images true, which checks every image once and leaves bad ones out.")
            sizes[index], rows[position] = paste(canvases[index], picture), index
        return images, torch.from_numpy(sizes)

    def read_encoded(self, positions):
        """(the JPEG bytes of each image as a uint8 numpy array, stored sizes `(n, 2)`). Arrays, not tensors: the
        Trainer's loader moves tensors to the GPU, and the GPU's JPEG decoder reads its input from the host."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        encoded = [np.frombuffer(value, dtype=np.uint8) for value in self.reader.values(positions)]
        return encoded, torch.from_numpy(self.sizes[positions])

    def subset(self, positions) -> "StreamedImages":
        positions = np.asarray(positions, dtype=np.int64)
        return StreamedImages(self.reader.subset(positions), self.sizes[positions], self.canvas,
                              None if self.labels is None else self.labels[torch.as_tensor(positions)],
                              self.class_names, self.split, self.skipped, self.short_side, self.num_workers)


class DeviceJPEGDecoder:
    """JPEG bytes of a batch (`StreamedImages.read_encoded`, on the host) -> uint8 canvases on `device` as decode.py
    makes them, decoded there by `decode` (1-D uint8 host tensors, channels -> CHW tensors on the device; default
    torchvision's, nvJPEG on a CUDA GPU)."""

    def __init__(self, canvas: tuple[int, int, int], device, decode=None):
        self.canvas, self.device = tuple(canvas), torch.device(device)
        self.decode = decode or torchvision_jpeg_decoder(self.device)

    def __call__(self, encoded: list, sizes: torch.Tensor) -> torch.Tensor:
        """Canvases of the fixed `canvas` shape: static shapes, and nothing to read back from the device."""
        datas = [torch.from_numpy(np.asarray(data)) for data in encoded]
        canvases = torch.empty((len(datas), *self.canvas), dtype=torch.uint8, device=self.device)
        for row, image in enumerate(self.decode(datas, self.canvas[0])):
            canvases[row, :, :image.shape[-2], :image.shape[-1]] = image
        return repeat_edges(canvases, sizes)


def torchvision_jpeg_decoder(device: torch.device):
    """torchvision's batched JPEG decoder for `device`, or a clear error saying what is missing."""
    if device.type != "cuda":
        raise ValueError(f"--decode_on_device true decodes JPEGs on a CUDA GPU; this run's device is {device}. "
                         "Leave the flag off (the DataLoader workers decode).")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as error:  # not installed, or a build that does not match torch
        raise ValueError(f"--decode_on_device true needs torchvision with GPU JPEG decoding, which does not import "
                         f"here ({type(error).__name__}: {error}). Install the torchvision build that matches your "
                         "torch, or leave the flag off (the DataLoader workers decode).") from None
    return lambda datas, channels: decode_jpeg(datas, mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY,
                                               device=device)


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
                                 free: int | None = None, processes: int | None = None) -> tuple[int, int]:
    """(workers, prefetch factor) whose batches in flight (workers x prefetch + 1, of `batch_bytes`: one batch of
    every loader that can hold batches at once) fit a third of this process's share of the free /dev/shm (a full one
    kills a worker with a bus error). Settings the user `chosen` are kept or refused; automatic ones are lowered."""
    free = shared_memory_free() if free is None else free
    if free is None or workers == 0:
        return workers, prefetch
    processes = processes_on_this_machine() if processes is None else processes
    room = free // 3 // processes
    need = lambda w, p: (w * p + 1) * batch_bytes  # noqa: E731
    if need(workers, prefetch) <= room:
        return workers, prefetch
    shared = f", shared by {processes} processes on this machine" if processes > 1 else ""
    advice = (f"/dev/shm has {free / 2**20:,.0f} MB free{shared}; {workers} DataLoader worker(s) x {prefetch} "
              f"prefetched batch(es) of {batch_bytes / 2**20:,.0f} MB need {need(workers, prefetch) / 2**20:,.0f} MB "
              f"per process (a third of the free memory is used at most). Give the container more shared memory "
              "(docker run --shm-size 16g), or lower --dataloader_num_workers, --dataloader_prefetch_factor or the "
              "batch size.")
    if chosen:
        raise ValueError(advice)
    while workers > 1 and need(workers, prefetch) > room:
        workers -= 1
    if need(workers, prefetch) > room:
        prefetch = 1
    if need(workers, prefetch) > room:
        raise ValueError(advice)
    print_once(f"warning: {advice} Using {workers} worker(s) x {prefetch} prefetched batch(es) instead.",
               file=sys.stderr)
    return workers, prefetch
