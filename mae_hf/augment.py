"""The strong fine-tuning recipe's augmentations (the DeiT family: RandAugment, mixup + cutmix, random erasing,
repeated augmentation, weight EMA) on whole batches on the training device, and the table of its parts.

Draws come from the given `generator`, else torch's global random state (seeded by `set_seed`, saved in checkpoints):
repeatable for a seed, and a resumed run continues the stream. Per-sample and per-batch choices are drawn on the host
and reach the device through pinned memory: nothing here waits for the device."""

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .inputs import written_whole
from .transfer import to_device

# The RandAugment / TrivialAugment operations: colour ops (pixel-wise or image statistics), then affine warps.
COLOUR_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize", "color", "contrast", "brightness",
              "sharpness")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOUR_OPS + GEOMETRIC_OPS
# Strength of each op at level 1 (magnitude 10), the "increasing" variant; signed ops get a random sign per sample.
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45  # fraction of the image side
MAX_ENHANCE = 0.9  # enhance factor 1 +- 0.9 (colour, contrast, brightness, sharpness)
MAX_POSTERIZE_DROP = 4  # bits dropped: 8 - 4 = 4 bits kept at level 1
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


@functools.cache
def _grey_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(GREY_WEIGHTS, device=device, dtype=dtype).view(1, 3, 1, 1)  # once: this waits for a GPU


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else (x * _grey_weights(x.device, x.dtype)).sum(1, keepdim=True)


def blend(image: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: `degenerate + factor * (image - degenerate)`, per-sample `factor`, clipped to [0, 1]."""
    return (degenerate + _per_sample(factor) * (image - degenerate)).clamp(0, 1)


def brightness(x, factor):
    return blend(x, torch.zeros_like(x), factor)


def color(x, factor):
    return blend(x, _grey(x).expand_as(x), factor)


def contrast(x, factor):
    return blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)


def sharpness(x, factor):
    """Blend with PIL's smoothing filter (3x3, centre weight 5, all /13); the border pixels stay as they are."""
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = (F.avg_pool2d(x, 3, stride=1) * 9 + 4 * x[..., 1:-1, 1:-1]) / 13
    return blend(x, smooth, factor)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round()


def posterize(x, bits):
    """Keep the top `bits` (per sample, 1..8) of each 8-bit value."""
    step = _per_sample(2.0 ** (8 - bits))
    return torch.floor(_to_levels(x) / step) * step / 255


def solarize(x, threshold):
    """Invert values at or above the per-sample `threshold` (in [0, 1])."""
    return torch.where(x >= _per_sample(threshold), 1 - x, x)


def autocontrast(x):
    """Stretch each channel of each image to [0, 1]; constant channels stay as they are."""
    low = x.amin(dim=(2, 3), keepdim=True)
    span = x.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp(min=1e-12), x)


def equalize(x):
    """Histogram equalisation of each channel of each image over 256 levels, by PIL's rule: levels spread by the
    cumulative histogram, with the last occupied level's count left out of the step."""
    batch, channels, height, width = x.shape
    levels = _to_levels(x).long().view(batch * channels, height * width)
    histogram = torch.zeros(batch * channels, 256, device=x.device, dtype=torch.long)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    last_count = histogram.gather(1, levels.amax(dim=1, keepdim=True))
    step = (height * width - last_count) // 255
    below = histogram.cumsum(1) - histogram  # pixels strictly below each level
    lookup = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    equalised = lookup.gather(1, levels).view_as(x).to(x.dtype) / 255
    return torch.where((step > 0).view(batch, channels, 1, 1), equalised, x)


def _colour_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Op `name` at per-sample `level` in [0, 1] (and `sign` +-1 for the enhance ops)."""
    if name == "identity":
        return x
    if name == "autocontrast":
        return autocontrast(x)
    if name == "equalize":
        return equalize(x)
    if name == "posterize":
        return posterize(x, 8 - (level * MAX_POSTERIZE_DROP).round())
    if name == "solarize":
        return solarize(x, 1 - level)
    factor = 1 + sign * level * MAX_ENHANCE
    return {"color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness}[name](x, factor)


def _affine(op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per-sample (host) `(B, 3, 3)` maps from output to input coordinates ([-1, 1] of a square image) of the
    geometric op each sample drew; the identity for samples that drew a colour op."""
    def chosen(name):
        return (op == OPS.index(name)).to(level.dtype) * sign * level

    angle = chosen("rotate") * math.radians(MAX_ROTATE_DEGREES)
    shear_x, shear_y = chosen("shear_x") * MAX_SHEAR, chosen("shear_y") * MAX_SHEAR
    # A shift of a fraction t of the side is 2t in [-1, 1] coordinates.
    shift_x, shift_y = chosen("translate_x") * 2 * MAX_TRANSLATE, chosen("translate_y") * 2 * MAX_TRANSLATE
    cos, sin = angle.cos(), angle.sin()
    matrix = torch.zeros(op.shape[0], 3, 3, dtype=level.dtype)
    # rotation @ shear: exact because at most one of angle, shear_x, shear_y is non-zero per sample.
    matrix[:, 0, 0], matrix[:, 0, 1] = cos - sin * shear_y, cos * shear_x - sin
    matrix[:, 1, 0], matrix[:, 1, 1] = sin + cos * shear_y, sin * shear_x + cos
    matrix[:, 0, 2], matrix[:, 1, 2], matrix[:, 2, 2] = shift_x, shift_y, 1
    return matrix


def warp(x: torch.Tensor, matrix: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """Affine warp of a batch with per-sample `(B, 3, 3)` output-to-input maps; outside pixels become `fill`."""
    grid = F.affine_grid(matrix[:, :2], list(x.shape), align_corners=False)
    # Zero padding of (x - fill), shifted back: a constant fill without a second sampling pass.
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


class RandAugment:
    """RandAugment (Cubuk et al. 2019) on a float batch in [0, 1]: each sample applies `num_ops` ops drawn from `OPS`
    at magnitude `magnitude` of 10, jittered per sample by a normal of std `magnitude_std` (timm's "rand-m9-mstd0.5").
    `trivial=True`: TrivialAugment (Müller & Hutter 2021), one op at a magnitude uniform in [0, 10]."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, trivial: bool = False,
                 fill: float = 0.5, op_prob: float = 1.0):
        if not trivial and num_ops < 1:
            raise ValueError(f"RandAugment needs num_ops >= 1, got {num_ops}.")
        if not 0 <= magnitude <= 10:
            raise ValueError(f"RandAugment magnitude must lie in [0, 10], got {magnitude}.")
        if magnitude_std < 0:
            raise ValueError(f"RandAugment magnitude_std must be >= 0, got {magnitude_std}.")
        if not 0 <= op_prob <= 1:
            raise ValueError(f"RandAugment op_prob must lie in [0, 1], got {op_prob}.")
        self.num_ops = 1 if trivial else num_ops
        self.op_prob = 1.0 if trivial else op_prob
        self.magnitude, self.magnitude_std, self.trivial, self.fill = magnitude, magnitude_std, trivial, fill

    def __repr__(self):
        if self.trivial:
            return "TrivialAugment()"
        return (f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
                f"op_prob={self.op_prob})")

    def draw(self, batch: int, generator=None):
        """Host tensors (op index, level in [0, 1], sign +-1) per sample, for one round."""
        op = torch.randint(len(OPS), (batch,), generator=generator)
        if self.trivial:
            level = torch.rand(batch, generator=generator)
        else:
            noise = torch.randn(batch, generator=generator) * self.magnitude_std
            level = ((self.magnitude + noise) / 10).clamp(0, 1)
        sign = torch.randint(0, 2, (batch,), generator=generator) * 2.0 - 1
        if self.op_prob < 1:  # timm applies each op with a probability (0.5 in DeiT's recipe): else the identity
            op = torch.where(torch.rand(batch, generator=generator) < self.op_prob, op, OPS.index("identity"))
        return op, level, sign

    @staticmethod
    def colour_round_(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Apply to each sample of `x`, in place, the colour op it drew (host tensors `op`, `level`, `sign`)."""
        order = torch.argsort(op, stable=True)  # samples grouped by op; group sizes known on the host
        counts = torch.bincount(op, minlength=len(OPS)).tolist()
        index = to_device(order, x.device)
        settings = to_device(torch.stack([level[order], sign[order]]).to(x.dtype), x.device)
        start = 0
        for name, count in zip(OPS, counts):
            if count and name in COLOUR_OPS[1:]:
                group, chosen = index[start:start + count], slice(start, start + count)
                x.index_copy_(0, group, _colour_op(name, x.index_select(0, group), settings[0, chosen],
                                                   settings[1, chosen]))
            start += count
        return x

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        batch = x.shape[0]
        matrix = torch.eye(3).expand(batch, 3, 3)
        x = x.clone()  # the rounds write in place; the caller's batch stays as it was
        for _ in range(self.num_ops):
            op, level, sign = self.draw(batch, generator)
            self.colour_round_(x, op, level, sign)
            matrix = matrix @ _affine(op, level, sign)
        return warp(x, to_device(matrix, x.device).to(x.dtype), self.fill)


def smooth_one_hot(labels: torch.Tensor, num_labels: int, smoothing: float = 0.0) -> torch.Tensor:
    """`(B, num_labels)` targets, label-smoothed as the Trainer's label smoothing does."""
    return F.one_hot(labels, num_labels).float() * (1 - smoothing) + smoothing / num_labels


class MixupCutmix:
    """Mixup (Zhang et al. 2017) or cutmix (Yun et al. 2019) of a batch with its reverse, one host draw per batch as
    in DeiT: mixed with probability `prob`, by cutmix with probability `switch_prob`, lambda ~ Beta(alpha, alpha);
    targets are the smoothed one-hots mixed by each image's share of the pixels (cutmix: the box actually pasted)."""

    def __init__(self, num_labels: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1):
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise ValueError("Mixup/cutmix needs mixup_alpha > 0 or cutmix_alpha > 0 (and neither negative); got "
                             f"{mixup_alpha} and {cutmix_alpha}.")
        for name, value in (("switch_prob", switch_prob), ("prob", prob), ("label_smoothing", label_smoothing)):
            if not 0 <= value <= 1:
                raise ValueError(f"Mixup/cutmix {name} must lie in [0, 1], got {value}.")
        self.num_labels, self.mixup_alpha, self.cutmix_alpha = num_labels, mixup_alpha, cutmix_alpha
        self.switch_prob, self.prob, self.label_smoothing = switch_prob, prob, label_smoothing

    def draw(self, height: int, width: int, generator=None):
        """(lambda, cutmix box (top, bottom, left, right) or None) for one batch."""
        def uniform():
            return torch.rand((), generator=generator).item()  # a CPU tensor: no device involved

        if uniform() >= self.prob:
            return 1.0, None
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or uniform() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        seed = int(torch.randint(2**62, (), generator=generator))  # numpy's beta, seeded from torch's stream
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        if not use_cutmix:
            return lam, None
        cut = math.sqrt(1 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        centre_y, centre_x = int(uniform() * height), int(uniform() * width)
        top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h // 2, height)
        left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w // 2, width)
        lam = 1 - (bottom - top) * (right - left) / (height * width)
        return lam, (top, bottom, left, right)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, generator=None):
        """(mixed images, soft targets `(B, num_labels)` float, rows summing to 1)."""
        lam, box = self.draw(x.shape[-2], x.shape[-1], generator)
        partner = x.flip(0)
        if box is None:
            mixed = x if lam == 1 else torch.lerp(partner, x, lam)  # lam * x + (1 - lam) * partner
        else:
            top, bottom, left, right = box
            mixed = x.clone()
            mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        targets = smooth_one_hot(labels, self.num_labels, self.label_smoothing)
        return mixed, targets * lam + targets.flip(0) * (1 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy against soft targets (rows of `targets` sum to 1), in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class RepeatedAugmentationSampler(torch.utils.data.Sampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): each epoch yields the first ceil(N / repeats)
    images of a permutation of (seed, epoch), each `repeats` times in a row, N indices in all. `repeats` >= 1:
    --repeated_augmentations is checked by its `STRONG_RECIPE` part."""

    def __init__(self, num_samples: int, repeats: int = 3, seed: int = 0):
        self.num_samples, self.repeats, self.seed, self.epoch = num_samples, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        distinct = -(-self.num_samples // self.repeats)
        return iter(order[:distinct].repeat_interleave(self.repeats)[:self.num_samples].tolist())


class WeightEMA(TrainerCallback):
    """Moving average of a model's floating-point weights, one `lerp` on the device per optimizer step, its decay warmed
    up as min(decay, (1 + step) / (10 + step)); `applied()` swaps it in; checkpoints hold it (`ema_state.pt`). `decay`
    in (0, 1): --ema_decay is checked by its `STRONG_RECIPE` part."""

    STATE_FILE = "ema_state.pt"

    def __init__(self, decay: float):
        self.decay = decay
        self.weights: list[torch.Tensor] = []  # the model's own tensors
        self.shadow: list[torch.Tensor] | None = None  # their averages
        self.updates = 0

    def start(self, model) -> None:
        """Start averaging from `model`'s current weights."""
        self.weights = [t.detach() for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.shadow = [t.clone() for t in self.weights]
        self.updates = 0

    def decay_now(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.decay_now()
        self.updates += 1
        torch._foreach_lerp_(self.shadow, self.weights, weight)

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its trained weights again after it."""
        trained = [t.clone() for t in self.weights]
        with torch.no_grad():
            torch._foreach_copy_(self.weights, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, trained)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.shadow is None:
            self.start(model)
            self.updates = state.global_step
            # A resume continues its checkpoint's average (without one, it restarts from the checkpoint's weights).
            saved = os.path.join(args.resume_from_checkpoint or "", self.STATE_FILE)
            if args.resume_from_checkpoint and os.path.isfile(saved):
                with torch.no_grad():
                    torch._foreach_copy_(self.shadow, torch.load(saved, map_location="cpu", weights_only=True))

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and self.shadow is not None and os.path.isdir(folder):
            with written_whole(os.path.join(folder, self.STATE_FILE)) as temporary:  # a torn file: no checkpoint
                torch.save([t.cpu() for t in self.shadow], temporary)

    def on_step_end(self, args, state, control, **kwargs):
        self.update()


def chained(ops: list) -> Callable | None:
    """The batch ops `ops` as one, applied in turn (None when there are none)."""
    if len(ops) < 2:
        return ops[0] if ops else None
    return functools.partial(functools.reduce, lambda x, op: op(x), ops)


def _rand_augment(args, trivial: bool = False) -> RandAugment:
    return RandAugment(args.randaugment_num_ops, args.randaugment_magnitude, args.randaugment_magnitude_std,
                       trivial=trivial, op_prob=args.randaugment_op_prob)


@dataclass(frozen=True)
class RecipePart:
    """One part of the strong fine-tuning recipe: its `FinetuneArguments` flag, the value that leaves it off, the flags
    that tune it (all recorded by `FinetuneArguments.recipe()`; any part on labels a run finetune_strong); their check,
    `valid(flag's value)` (else "--flag {rule}") or `check(args)`; and `build(args)` for a batch op on images in
    [0, 1], run after crop/flip in table order when the part is on."""

    flag: str
    off: object
    settings: tuple[str, ...] = ()
    check: Callable | None = None
    valid: Callable | None = None
    rule: str = ""
    build: Callable | None = None


STRONG_RECIPE = (
    RecipePart("augment_policy", "none", ("randaugment_num_ops", "randaugment_magnitude", "randaugment_magnitude_std",
                                          "randaugment_op_prob"),
               _rand_augment,  # every RandAugment setting is checked, even with the policy off
               valid=lambda policy: policy in ("none", "randaugment", "trivialaugment"),
               rule="must be none, randaugment or trivialaugment, got {value!r}.",
               build=lambda args: _rand_augment(args, trivial=args.augment_policy == "trivialaugment")),
    RecipePart("mixup_alpha", 0.0, check=lambda args: args.mixer(2)),  # checks cutmix's too: one mixer does both
    RecipePart("cutmix_alpha", 0.0, ("mixup_switch_prob", "mixup_prob")),
    RecipePart("random_erasing", 0.0, valid=lambda p: 0 <= p <= 1, rule="is a probability in [0, 1], got {value}."),
    RecipePart("repeated_augmentations", 1, valid=lambda k: k >= 1, rule="must be >= 1, got {value}."),
    RecipePart("ema_decay", 0.0, valid=lambda d: d == 0 or 0 < d < 1,
               rule="must lie in (0, 1), or be 0 for no EMA; got {value}."),
)
STRONG_RECIPE_OFF = {part.flag: part.off for part in STRONG_RECIPE}
