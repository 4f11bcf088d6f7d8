"""Whole-batch image transforms on the training device: uint8 canvases (see decode.py) in, normalised model inputs
out (docs/data.md, "Images"). Crops and flips are drawn from the transform's own generator, saved in checkpoints:
a run's batches depend on its seed only, not on DataLoader workers or a resume."""

import math

import torch
import torch.nn.functional as F

from ..transfer import to_device

CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop: tries before falling back to a centre crop
MIN_EVAL_CROP_FRACTION = 0.875  # 224 of 256: ImageNet's evaluation crop
# uint8 canvases become floats this many bytes at a time, as they are sampled: a ViT-B batch of 256 large canvases
# from a prepared folder would take about 450 MB as one float tensor, most of it padding the crops never read.
FLOAT_CHUNK_BYTES = 64 * 2**20


def as_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as floats in [0, 1]; float images as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def valid_sizes(images: torch.Tensor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """(heights, widths) as float tensors on the images' device: `sizes` (B, 2; best on the host), or the canvas."""
    batch, _, height, width = images.shape
    if sizes is None:
        full = torch.ones(batch, device=images.device)
        return full * height, full * width
    sizes = to_device(sizes, images.device).float()
    return sizes[:, 0], sizes[:, 1]


def sampled(images: torch.Tensor, grid: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """`grid_sample` (bilinear) of canvases at `grid`, uint8 canvases converted to floats a few at a time."""
    chunk = max(1, FLOAT_CHUNK_BYTES // (4 * math.prod(images.shape[1:])))
    if images.dtype != torch.uint8 or chunk >= len(images):
        return F.grid_sample(as_floats(images), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    output = torch.empty((len(images), images.shape[1], *grid.shape[1:3]), device=images.device)
    for start in range(0, len(images), chunk):
        part = slice(start, start + chunk)
        output[part] = F.grid_sample(as_floats(images[part]), grid[part], mode="bilinear", padding_mode=padding_mode,
                                     align_corners=False)
    return output


def random_resized_crop(images: torch.Tensor, size: int, sizes=None, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3), hflip: bool = False, generator: torch.Generator | None = None
                        ) -> torch.Tensor:
    """Random-resized crop (and optional horizontal flip) of a batch of canvases, resampled bilinearly to `size` x
    `size` (floats in [0, 1] for uint8 input), as torchvision's RandomResizedCrop in each image's own pixels (`sizes`;
    None = the whole canvas). The same number of random values is drawn for every batch, whatever the outcome."""
    batch, _, canvas_height, canvas_width = images.shape
    device = images.device
    height, width = valid_sizes(images, sizes)
    draws = torch.rand(batch, CROP_ATTEMPTS, 2, device=device, generator=generator)
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = (log_low + (log_high - log_low) * draws[..., 1]).exp()
    crop_w, crop_h = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (crop_w <= width[:, None]) & (crop_h <= height[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none)
    crop_w, crop_h, found = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0], fits.any(dim=1)
    image_ratio = width / height  # fallback: the largest centred crop whose aspect lies in `ratio`
    fallback_w = torch.where(image_ratio > ratio[1], height * ratio[1], width)
    fallback_h = torch.where(image_ratio < ratio[0], width / ratio[0], height)
    crop_w, crop_h = torch.where(found, crop_w, fallback_w), torch.where(found, crop_h, fallback_h)
    position = torch.rand(batch, 3, device=device, generator=generator)
    left = torch.where(found, position[:, 0], 0.5) * (width - crop_w)
    top = torch.where(found, position[:, 1], 0.5) * (height - crop_h)
    # Canvas pixels to grid_sample's [-1, 1] coordinates (align_corners=False: -1 and 1 are the canvas's edges).
    scale_x, scale_y = crop_w / canvas_width, crop_h / canvas_height
    if hflip:
        scale_x = torch.where(position[:, 2] < 0.5, -scale_x, scale_x)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, 2 * (left + crop_w / 2) / canvas_width - 1
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, 2 * (top + crop_h / 2) / canvas_height - 1
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    return sampled(images, grid)


def random_erasing(x: torch.Tensor, probability: float = 0.25, area=(0.02, 1 / 3), ratio=(0.3, 3.3),
                   generator=None) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) of a normalised batch: with `probability`, a sample gets one rectangle of
    area fraction in `area` and log-uniform aspect ratio in `ratio` (clipped to the image) replaced by standard
    normal noise per pixel and channel."""
    batch, _, height, width = x.shape
    device = x.device
    draws = torch.rand(5, batch, 1, 1, device=device, generator=generator)  # one call: few small ops
    erase = draws[0] < probability
    target = draws[1] * (area[1] - area[0]) + area[0]
    aspect = (draws[2] * math.log(ratio[1] / ratio[0]) + math.log(ratio[0])).exp()
    box_h = ((target * aspect).sqrt() * height).round().clamp(1, height)
    box_w = ((target / aspect).sqrt() * width).round().clamp(1, width)
    top = (draws[3] * (height - box_h + 1)).floor()
    left = (draws[4] * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    # Row and column tests are small; only their product has the image's size.
    inside = ((rows >= top) & (rows < top + box_h) & erase) & ((cols >= left) & (cols < left + box_w))
    noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
    return torch.where(inside[:, None], noise, x)


def center_crop(images: torch.Tensor, size: int, sizes=None, fraction: float = 1.0,
                antialias: bool = True) -> torch.Tensor:
    """The centre square of each image holding `fraction` of its short side, resized to `size` (floats in [0, 1] for
    uint8 canvases): bicubic and antialiased, crops of one size cut out together; or with `antialias=False` bilinear
    in one `grid_sample` (`--crop_min_scale 1`). Neither waits for the device when `sizes` are on the host."""
    batch, channels, canvas_height, canvas_width = images.shape
    device = images.device
    if not antialias:
        height, width = valid_sizes(images, sizes)
        side = torch.minimum(height, width) * fraction
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = side / canvas_width, width / canvas_width - 1  # centred on the image
        theta[:, 1, 1], theta[:, 1, 2] = side / canvas_height, height / canvas_height - 1
        return sampled(images, F.affine_grid(theta, [batch, channels, size, size], align_corners=False))
    sizes = None if sizes is None else torch.as_tensor(sizes).cpu().float()  # on a device: read back, which waits
    whole = sizes is None or bool((sizes == torch.tensor([canvas_height, canvas_width])).all())
    if whole and fraction == 1 and canvas_height == canvas_width:
        if canvas_height == size:
            return as_floats(images)
        return F.interpolate(as_floats(images), size=(size, size), mode="bicubic", antialias=True)
    if sizes is None:
        sizes = torch.tensor([[canvas_height, canvas_width]], dtype=torch.float32).expand(batch, 2)
    side = (sizes.min(dim=1).values * fraction).round().clamp(min=1)
    top, left = ((sizes[:, 0] - side) / 2).floor().long(), ((sizes[:, 1] - side) / 2).floor().long()
    output = torch.empty((batch, channels, size, size), device=device)
    channel = torch.arange(channels, device=device)[:, None, None]
    for crop in side.unique().tolist():  # usually one or a few sizes per batch
        chosen = (side == crop).nonzero()[:, 0]
        index, rows, cols = to_device(torch.stack([chosen, top[chosen], left[chosen]]), device)
        steps = torch.arange(int(crop), device=device)
        rows = (rows[:, None] + steps)[:, None, :, None]
        cols = (cols[:, None] + steps)[:, None, None, :]
        crops = as_floats(images[index[:, None, None, None], channel, rows, cols])
        if crop != size:
            crops = F.interpolate(crops, size=(size, size), mode="bicubic", antialias=True)
        output[index] = crops
    return output


def stored_short_side(image_size: int) -> int:
    """The short side images are stored at for a model of `image_size` (never scaled up): room for the evaluation's
    centre crop, 256 for 224 (ImageNet's convention)."""
    return max(image_size, round(image_size / MIN_EVAL_CROP_FRACTION))


def default_eval_crop_fraction(image_size: int, short_side: int) -> float:
    """The evaluation crop's share of the short side: image size / the images' (median) stored short side, at least
    0.875 (224 of 256) and at most 1 (images no larger than the model's size, e.g. CIFAR-10)."""
    return min(1.0, max(MIN_EVAL_CROP_FRACTION, image_size / short_side))


class BatchTransform:
    """uint8 canvases `(B, C, H, W)` (+ each image's height and width) -> normalised float batch at `image_size`.

    Training (`crop_scale` given): random-resized crop and optional flip, then optional `augment` (a batch op on
    floats in [0, 1], e.g. `augment.RandAugment`), normalisation and optional random erasing (probability
    `random_erasing`). Evaluation: the centre crop of `eval_crop_fraction` of the short side, and normalisation.
    Runs on the batch's device and never waits for it when the sizes are on the host.
    """

    def __init__(self, image_size: int, mean, std, crop_scale: tuple[float, float] | None = None,
                 hflip: bool = False, augment=None, random_erasing: float = 0.0, eval_crop_fraction: float = 1.0,
                 seed: int = 0, training: bool = False):
        self.image_size, self.crop_scale, self.hflip, self.training = image_size, crop_scale, hflip, training
        self.augment, self.random_erasing, self.eval_crop_fraction = augment, random_erasing, eval_crop_fraction
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._statistics = {}  # device -> (mean, std) there
        self.seed, self.generator, self._pending_state = seed, None, None  # generator: on the first batch's device

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":  # shapes only (tests that trace the transform): nothing to draw
            return None
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self.generator.set_state(self._pending_state)
                self._pending_state = None
        return self.generator

    def state(self) -> torch.Tensor | None:
        """The generator's state, for a checkpoint (None before the first batch: then the seed says it all)."""
        return None if self.generator is None else self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        """Continue the random stream of a checkpoint (applied when the generator is made, or now)."""
        if self.generator is None:
            self._pending_state = state
        else:
            self.generator.set_state(state)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchTransform expects uint8 images, got {images.dtype}.")
        if self.crop_scale is not None:  # uint8 canvases in, the crops' floats out
            x = random_resized_crop(images, self.image_size, sizes, self.crop_scale, hflip=self.hflip,
                                    generator=self.generator_for(images.device))
        else:
            x = center_crop(images, self.image_size, sizes, self.eval_crop_fraction, antialias=not self.training)
            if self.hflip:
                flip = torch.rand(x.shape[0], device=x.device, generator=self.generator_for(x.device)) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.augment is not None:
            x = self.augment(x)
        if x.device not in self._statistics:  # copied once: a host-to-device copy in every batch waits for the device
            self._statistics[x.device] = self.mean.to(x.device), self.std.to(x.device)
        mean, std = self._statistics[x.device]
        x = (x - mean) / std
        if self.random_erasing > 0:
            x = random_erasing(x, self.random_erasing)
        return x

    @classmethod
    def for_model(cls, config, **options) -> "BatchTransform":
        """The transform for `config`'s image size and normalisation; `options` are `__init__`'s keywords."""
        return cls(config.image_size, config.image_mean, config.image_std, **options)
