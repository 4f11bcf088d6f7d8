"""A split decoded once into one uint8 tensor of canvases (`InMemoryImages`): the fastest path when the images fit
in memory (CIFAR-10 is 150 MB). The tensor is allocated once at its final size and filled in place, chunk by chunk
(by DataLoader worker processes when there are many images), so decoding costs little memory beyond the pixels."""

import os

import numpy as np
import torch

from .decode import BadImage, paste
from .splits import ImageData

CHUNK = 256  # images a decoding worker handles at a time
PARALLEL_FROM = 2048  # fewer images decode faster in this process than worker processes start


def cpus_per_process() -> int:
    """The CPUs this process may use, shared with the other training processes on this machine (torchrun's
    LOCAL_WORLD_SIZE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class InMemoryImages(ImageData):
    """Canvases `(N, C, H, W)` uint8 and sizes `(N, 2)` int32 in memory (host, or GPU with `to`)."""

    in_memory = True

    def __init__(self, images: torch.Tensor, sizes: torch.Tensor, labels=None, class_names=None, split: str = "",
                 skipped=(), short_side: int | None = None):
        super().__init__(labels, class_names, split, skipped, tuple(images.shape[1:]),
                         short_side or min(images.shape[-2:]))
        self.images, self.sizes = images, sizes

    def __len__(self):
        return self.images.shape[0]

    def read(self, positions):
        index = torch.as_tensor(positions)
        if self.images.device.type == "cuda":  # from pinned memory the copy is asynchronous: no wait for the GPU
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[index], self.sizes[index]

    def subset(self, positions) -> "InMemoryImages":
        index = torch.as_tensor(positions)
        return InMemoryImages(self.images[index.to(self.images.device)], self.sizes[index.to(self.sizes.device)],
                              None if self.labels is None else self.labels[index], self.class_names, self.split,
                              self.skipped, self.short_side)

    def to(self, device) -> "InMemoryImages":
        self.images, self.sizes = self.images.to(device), self.sizes.to(device)
        return self


class _Chunks(torch.utils.data.Dataset):
    """Chunk k of `positions`, decoded onto canvases in a worker: (canvases, sizes, {index: problem})."""

    def __init__(self, reader, positions: np.ndarray, canvas: tuple[int, int, int]):
        self.reader, self.positions, self.canvas = reader, positions, canvas

    def __len__(self):
        return -(-len(self.positions) // CHUNK)

    def __getitem__(self, chunk: int):
        positions = self.positions[chunk * CHUNK:(chunk + 1) * CHUNK]
        images = torch.empty((len(positions), *self.canvas), dtype=torch.uint8)
        sizes, problems = decode_onto(self.reader, positions, images.numpy())
        return images, torch.from_numpy(sizes), problems


def decode_onto(reader, positions, canvases: np.ndarray) -> tuple[np.ndarray, dict]:
    """Decode the images at `positions` onto `canvases` (one per image); (sizes, {index: why undecodable})."""
    sizes, problems = np.zeros((len(positions), 2), dtype=np.int32), {}
    for index, pixels in enumerate(reader.read(positions)):
        if isinstance(pixels, BadImage):
            problems[index] = str(pixels)
            canvases[index] = 0
        elif pixels.shape[1] > canvases.shape[2] or pixels.shape[2] > canvases.shape[3]:
            problems[index] = (f"it decodes to {pixels.shape[1]}x{pixels.shape[2]}, larger than its header said "
                               f"(canvas {canvases.shape[2]}x{canvases.shape[3]})")
            canvases[index] = 0
        else:
            sizes[index] = paste(canvases[index], pixels)
    return sizes, problems


def _chunk_results(dataset, workers: int):
    """Each chunk's result in order, from `workers` processes (or this one)."""
    if workers == 0:
        for chunk in range(len(dataset)):
            yield dataset[chunk]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda item: item,
                                         generator=torch.Generator())  # leaves the global random state alone
    yield from loader


def header_sizes(reader, positions: np.ndarray, workers: int, progress: str | None = None):
    """(sizes `(n, 2)`, {index: problem}) of the images at `positions` as they will be stored (headers only)."""
    if reader.stored:
        return reader.sizes(positions)

    class Headers(torch.utils.data.Dataset):
        def __len__(self):
            return -(-len(positions) // CHUNK)

        def __getitem__(self, chunk):
            sizes, problems = reader.sizes(positions[chunk * CHUNK:(chunk + 1) * CHUNK])
            return torch.from_numpy(sizes), problems

    from tqdm.auto import tqdm

    sizes, problems = np.zeros((len(positions), 2), dtype=np.int32), {}
    bar = tqdm(total=len(positions), desc=progress, unit="img", disable=progress is None or len(positions) < 10_000)
    for chunk, (chunk_sizes, chunk_problems) in enumerate(_chunk_results(Headers(), workers)):
        sizes[chunk * CHUNK:chunk * CHUNK + len(chunk_sizes)] = chunk_sizes.numpy()
        problems.update({chunk * CHUNK + index: problem for index, problem in chunk_problems.items()})
        bar.update(len(chunk_sizes))
    bar.close()
    return sizes, problems


def decode_into_memory(reader, positions: np.ndarray, sizes: np.ndarray, channels: int, workers: int,
                       progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Decode the images at `positions` (stored sizes `sizes`, from their headers) into one tensor of canvases of
    the largest height and width. Returns (canvases, decoded sizes, {index: why undecodable})."""
    from tqdm.auto import tqdm

    canvas = (channels, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    images = torch.empty((len(positions), *canvas), dtype=torch.uint8)
    decoded, problems = np.zeros((len(positions), 2), dtype=np.int32), {}
    chunks = _Chunks(reader, positions, canvas)
    bar = tqdm(total=len(positions), desc=progress, unit="img", disable=progress is None)
    if workers == 0:  # straight into the tensor: no copy
        for start in range(0, len(positions), CHUNK):
            end = min(start + CHUNK, len(positions))
            chunk_sizes, chunk_problems = decode_onto(reader, positions[start:end], images[start:end].numpy())
            decoded[start:end] = chunk_sizes
            problems.update({start + index: problem for index, problem in chunk_problems.items()})
            bar.update(end - start)
    else:
        for chunk, (chunk_images, chunk_sizes, chunk_problems) in enumerate(_chunk_results(chunks, workers)):
            start = chunk * CHUNK
            images[start:start + len(chunk_images)] = chunk_images
            decoded[start:start + len(chunk_images)] = chunk_sizes.numpy()
            problems.update({start + index: problem for index, problem in chunk_problems.items()})
            bar.update(len(chunk_images))
    bar.close()
    return images, torch.from_numpy(decoded), problems


def keep_rows(images: torch.Tensor, sizes: torch.Tensor, keep: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `keep` (ascending) moved to the front in place, without a second copy of the pixels."""
    for destination, source in enumerate(keep.tolist()):
        if destination != source:
            images[destination] = images[source]
    return images[:len(keep)], sizes[torch.as_tensor(keep)]
