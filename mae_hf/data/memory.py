"""A split decoded once into memory (`InMemoryImages`): the fastest path when the images fit. The storage is
allocated once at its final size and filled in place, chunk by chunk, so decoding costs little beyond the pixels."""

import functools
import math
import os

import numpy as np
import torch

from ..transfer import to_device
from .decode import BadImage, channels_first, paste
from .policy import processes_on_this_machine
from .splits import ImageData

CHUNK = 256  # images a decoding worker handles at a time (fewer when they are large: see `chunk_size`)
CHUNK_BYTES = 16 * 2**20
CANVAS_WASTE = 1.25  # canvases may take this much more memory than the pixels; beyond, images are packed


def cpus_per_process() -> int:
    """The CPUs this process may use, shared with the other training processes on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // processes_on_this_machine())


def storage_plan(sizes: np.ndarray, channels: int) -> tuple[tuple[int, int, int], bool, int]:
    """(canvas, whether on canvases rather than packed, bytes taken) of images of stored `sizes` (n, 2) in memory."""
    pixels = channels * int((sizes[:, 0].astype(np.int64) * sizes[:, 1]).sum())
    canvas = (channels, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    dense = len(sizes) * math.prod(canvas) <= CANVAS_WASTE * pixels
    return canvas, dense, len(sizes) * math.prod(canvas) if dense else pixels


def repeat_edges(canvases: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Canvases whose images (top left, `sizes` (B, 2)) are extended by repeating their last row and column, in one
    gather (for canvases on a GPU, where a loop over images would launch a kernel per image)."""
    batch, channels, height, width = canvases.shape
    device = canvases.device
    sizes = to_device(sizes, device).long()
    rows = torch.minimum(torch.arange(height, device=device)[None], sizes[:, :1] - 1)
    cols = torch.minimum(torch.arange(width, device=device)[None], sizes[:, 1:] - 1)
    return canvases[torch.arange(batch, device=device)[:, None, None, None],
                    torch.arange(channels, device=device)[None, :, None, None], rows[:, None, :, None],
                    cols[:, None, None, :]]


class InMemoryImages(ImageData):
    """Decoded images in memory (host, or GPU with `to`) with their sizes `(N, 2)` int32 (on the host): as canvases
    `(N, C, H, W)` (`images`; a batch is one gather), or packed (`packed`: every image's channels-first pixels end to
    end from `offsets`, pasted onto `canvas` per batch) when canvases would take over `CANVAS_WASTE` x the pixels."""

    in_memory = True

    def __init__(self, images: torch.Tensor | None, sizes: torch.Tensor, labels=None, class_names=None,
                 split: str = "", skipped=(), short_side: int | None = None, packed: torch.Tensor | None = None,
                 offsets: np.ndarray | None = None, canvas: tuple[int, int, int] | None = None):
        canvas = tuple(images.shape[1:]) if images is not None else tuple(canvas)
        super().__init__(labels, class_names, split, skipped, canvas, short_side or min(canvas[1:]))
        self.images, self.sizes, self.packed = images, sizes, packed
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.int64)
        self.host_sizes = sizes.numpy()  # for packed reads: slicing needs them as numbers

    def __len__(self):
        return len(self.sizes)

    @property
    def decoded_bytes(self) -> int:
        return (self.images if self.images is not None else self.packed).numel()

    def read(self, positions):
        index = torch.as_tensor(positions)
        sizes = self.sizes[index]  # on the host, where the transforms want them
        if self.images is not None:
            return self.images[to_device(index, self.images.device)], sizes
        chosen, channels, on_host = index.numpy().reshape(-1), self.canvas[0], self.packed.device.type == "cpu"
        canvases = torch.empty((len(chosen), *self.canvas), dtype=torch.uint8, device=self.packed.device)
        for row, (start, (height, width)) in enumerate(zip(self.offsets[chosen], self.host_sizes[chosen])):
            image = self.packed[start:start + channels * height * width].view(channels, height, width)
            if on_host:
                paste(canvases[row].numpy(), image.numpy())
            else:
                canvases[row, :, :height, :width] = image
        return (canvases if on_host else repeat_edges(canvases, sizes)), sizes

    def subset(self, positions) -> "InMemoryImages":
        index = torch.as_tensor(positions).cpu()  # e.g. from labels on the device: a selection made once, not per step
        labels = None if self.labels is None else self.labels[to_device(index, self.labels.device)]
        images = None if self.images is None else self.images[to_device(index, self.images.device)]
        offsets = None if self.offsets is None else self.offsets[index.numpy()]
        return InMemoryImages(images, self.sizes[index], labels, self.class_names, self.split, self.skipped,
                              self.short_side, self.packed, offsets, self.canvas)

    def to(self, device) -> "InMemoryImages":
        """The pixels and labels on `device` (a batch is then one gather there, its labels with it); the sizes stay
        on the host, where the transforms read them without waiting for the device."""
        if self.images is not None:
            self.images = self.images.to(device)
        else:
            self.packed = self.packed.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self


def _decoded(reader, channels: int, positions) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the decoded images' channels-first pixels end to end, sizes, {index: why undecodable}) of `positions`."""
    sizes, problems, parts = np.zeros((len(positions), 2), dtype=np.int32), {}, []
    for index, picture in enumerate(reader.read(positions)):
        if isinstance(picture, BadImage):
            problems[index] = str(picture)
            continue
        pixels = channels_first(picture)
        if pixels.shape[0] != channels:  # the pixels end to end would no longer line up with their sizes
            problems[index] = f"it decodes to {pixels.shape[0]} channel(s), not {channels}"
            continue
        sizes[index] = pixels.shape[1:]
        parts.append(pixels.reshape(-1))
    pixels = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return torch.from_numpy(pixels), torch.from_numpy(sizes), problems


def _chunk_results(work, positions: np.ndarray, workers: int, size: int, progress: str | None):
    """(first index, `work(chunk)`) of each chunk of `size` positions in order, from `workers` DataLoader processes
    (or this one), with a progress bar named `progress` (None: none)."""
    from tqdm.auto import tqdm

    starts = range(0, len(positions), size)
    chunks = [positions[start:start + size] for start in starts]
    # batch_size=None: workers apply `collate_fn` to each chunk; a generator of its own leaves the global one alone
    results = map(work, chunks) if workers == 0 else torch.utils.data.DataLoader(
        chunks, batch_size=None, num_workers=workers, collate_fn=work, generator=torch.Generator())
    with tqdm(total=len(positions), desc=progress, unit="img", disable=progress is None) as bar:
        for start, chunk, result in zip(starts, chunks, results):
            yield start, result
            bar.update(len(chunk))


def header_sizes(reader, positions: np.ndarray, workers: int, progress: str | None = None):
    """(sizes `(n, 2)`, {index: problem}) of the images at `positions` as they will be stored (headers only)."""
    if reader.stored:
        return reader.sizes(positions)
    sizes, problems = np.zeros((len(positions), 2), dtype=np.int32), {}
    for start, (chunk_sizes, chunk_problems) in _chunk_results(reader.sizes, positions, workers, CHUNK,
                                                               progress if len(positions) >= 10_000 else None):
        sizes[start:start + len(chunk_sizes)] = chunk_sizes
        problems.update({start + index: problem for index, problem in chunk_problems.items()})
    return sizes, problems


def decode_into_memory(reader, positions: np.ndarray, sizes: np.ndarray, channels: int, workers: int,
                       progress: str | None = None) -> tuple[torch.Tensor | None, dict, dict]:
    """Decode the images at `positions` (stored sizes `sizes`, from their headers) into memory, on canvases or packed
    (`InMemoryImages`): (canvases or None, {index: why undecodable}, {"packed", "offsets", "canvas"} or {}). Every
    image decoded has its header's size (another is a problem)."""
    pixels = channels * sizes[:, 0].astype(np.int64) * sizes[:, 1]
    canvas, dense, _ = storage_plan(sizes, channels)
    offsets = np.concatenate([[0], np.cumsum(pixels)[:-1]]).astype(np.int64)
    images = torch.empty((len(positions), *canvas), dtype=torch.uint8) if dense else None
    packed = None if dense else torch.empty(int(pixels.sum()), dtype=torch.uint8)
    target = images.numpy() if dense else packed.numpy()
    problems = {}
    chunk_size = int(np.clip(CHUNK_BYTES // max(1, int(pixels.mean())), 1, CHUNK))  # a chunk in flight: ~16 MB
    work = functools.partial(_decoded, reader, channels)
    for start, (flat, chunk_sizes, chunk_problems) in _chunk_results(work, positions, workers, chunk_size, progress):
        flat, cursor = flat.numpy(), 0
        for index in range(len(chunk_sizes)):
            row = start + index
            if index in chunk_problems:
                problems[row] = chunk_problems[index]
                continue
            height, width = chunk_sizes[index].tolist()
            size = channels * height * width
            if (height, width) != tuple(sizes[row]):  # the header promised another size: not stored
                problems[row] = f"it decodes to {height}x{width}, its header says {sizes[row][0]}x{sizes[row][1]}"
            elif dense:
                paste(target[row], flat[cursor:cursor + size].reshape(channels, height, width))
            else:
                target[offsets[row]:offsets[row] + size] = flat[cursor:cursor + size]
            cursor += size
    storage = {} if dense else {"packed": packed, "offsets": offsets, "canvas": canvas}
    return images, problems, storage


def keep_rows(images: torch.Tensor | None, sizes: np.ndarray, keep: np.ndarray, storage: dict):
    """Only the rows `keep` (ascending): canvases moved to the front in place, without a second copy of the
    pixels; packed images simply lose their offsets."""
    if images is None:
        return None, sizes[keep], {**storage, "offsets": storage["offsets"][keep]}
    for destination, source in enumerate(keep.tolist()):
        if destination != source:
            images[destination] = images[source]
    return images[:len(keep)], sizes[keep], storage
