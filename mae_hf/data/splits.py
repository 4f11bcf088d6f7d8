"""One split's images however they are held (`ImageData`: labels, provenance, `read(positions)` -> uint8 canvases +
sizes), the `ImageDataset` that loaders read whole batches from, and a sequential pass for feature extraction."""

import numpy as np
import torch

from ..transfer import to_device


class ImageData:
    """One split: `len()` images on `(channels, height, width)` canvases (see decode.py), `labels` `(N,)` int64
    (-1 = unlabelled) or None, `class_names`, `split` (where the images came from) and `skipped` (images left out
    by --skip_bad_images). `short_side` is the geometry's: the evaluation crop is relative to it."""

    in_memory = False
    num_workers = 0  # DataLoader workers a pass over this split should use

    def __init__(self, labels: torch.Tensor | None, class_names: list[str] | None, split: str, skipped: list[str],
                 canvas: tuple[int, int, int], short_side: int):
        self.labels, self.class_names, self.split, self.skipped = labels, class_names, split, list(skipped)
        self.canvas, self.short_side = tuple(canvas), short_side

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 `(n, C, H, W)` canvases, host int32 `(n, 2)` heights and widths) of the images at `positions`."""
        raise NotImplementedError

    def subset(self, positions) -> "ImageData":
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Classes of the label column: its class names when it has them, else the largest label + 1 (after
        `validate_labels`, the evaluation split's labels are a subset of the training split's)."""
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def labelled(self) -> "ImageData":
        """The images that have a label (pretraining accepts -1 / None as "unlabelled"; those are left out)."""
        keep = self.labels >= 0
        return self if bool(keep.all()) else self.subset(keep.nonzero()[:, 0])

    def sample(self, count: int | None, seed: int) -> "ImageData":
        """`count` images drawn at random with `seed` (all of them, in order, when `count` is None or too large):
        a split stored class by class (image folders) then still gives every class its share."""
        if count is None or count >= len(self):
            return self
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return self.subset(chosen.sort().values)


class ImageDataset(torch.utils.data.Dataset):
    """An `ImageData` for DataLoaders, fetched a whole batch at a time (`__getitems__`): `pixel_values` (uint8 canvases,
    transformed on the device by the trainer), `image_sizes` (a host numpy array), optional `labels` and `noise` (fixed
    masking noise: comparable evaluation losses). With `encoded` (--decode_on_device), `encoded_images` (JPEG bytes,
    decoded on the GPU by `streaming.DeviceJPEGDecoder`) replace `pixel_values`."""

    def __init__(self, data: ImageData, labels: bool = False, noise: torch.Tensor | None = None, encoded: bool = False):
        self.data, self.noise, self.encoded = data, noise, encoded
        self.labels = data.labels if labels else None
        if labels and data.labels is None:
            raise ValueError(f"The split {data.split!r} has no labels.")

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices):
        if self.encoded:
            encoded, sizes = self.data.read_encoded(indices)
            batch = {"encoded_images": encoded}
        else:
            images, sizes = self.data.read(indices)
            batch = {"pixel_values": images}
        # A numpy array, which the Trainer's loader leaves on the host: the transforms read the sizes there (the
        # evaluation crop groups images by them) and copy them to the device without waiting.
        batch["image_sizes"] = sizes.numpy()
        if self.labels is not None or self.noise is not None:
            index = torch.as_tensor(indices)
            if self.labels is not None:  # on the device when the split is (InMemoryImages.to)
                batch["labels"] = self.labels[to_device(index, self.labels.device)]
            if self.noise is not None:
                batch["noise"] = self.noise[index]
        return batch


def collate(batch):
    """Batches from `ImageDataset.__getitems__` are already stacked; single items (other loaders) get stacked."""
    if isinstance(batch, dict):
        return batch
    stack = {key: np.stack if isinstance(value, np.ndarray) else torch.stack for key, value in batch[0].items()}
    return {key: stack[key]([item[key] for item in batch]) for key in batch[0]}


def fixed_noise(num_images: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise that is the same at every evaluation."""
    return torch.rand(num_images, num_patches, generator=torch.Generator().manual_seed(seed))


def sequential_batches(data: ImageData, batch_size: int, pin_memory: bool = False):
    """(uint8 canvases, sizes) of every image in order, `batch_size` at a time: sliced from memory, or read by the
    split's DataLoader workers (`data.num_workers`) while the caller computes."""
    if data.num_workers == 0:
        for start in range(0, len(data), batch_size):
            yield data.read(torch.arange(start, min(start + batch_size, len(data))))
        return
    loader = torch.utils.data.DataLoader(ImageDataset(data), batch_size=batch_size, num_workers=data.num_workers,
                                         collate_fn=collate, pin_memory=pin_memory,
                                         generator=torch.Generator())  # leaves the global random state alone
    for batch in loader:
        yield batch["pixel_values"], torch.from_numpy(batch["image_sizes"])
