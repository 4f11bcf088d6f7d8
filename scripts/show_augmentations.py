r"""Draw what the fine-tuned model sees: a few training images through a fine-tuning recipe's augmentation.

    python scripts/show_augmentations.py configs/cpu_small_finetune_strong.yaml --dataset_name ../shared/data/cifar10 \
        --max_train_samples 64 --output_dir docs

The augmentation is applied exactly as scripts/finetune.py applies it on the device (crop/flip -> RandAugment ->
normalise -> random erasing, then mixup/cutmix over the batch), shown de-normalised.
Writes augmented_batch.png to --output_dir: one column per image; rows: the image as evaluated, then
--repeated_augmentations views of it (the copies a batch holds, each differently augmented), then the first view
after mixup/cutmix with the batch. Takes finetune.py's flags (a config file, then flags); --num_images picks how many.
"""

import os
from dataclasses import dataclass

import torch
from transformers import set_seed

from mae_hf.cli import UsageError, flag, parse_args, run_script
from mae_hf.data import DataArguments, eval_crop_fraction, load_image_splits
from mae_hf.loading import ModelArguments, build_config
from mae_hf.training_args import FinetuneArguments
from mae_hf.visualize import grid_image


@dataclass
class PictureArguments:
    num_images: int = flag(8, "Training images shown (columns).")


def augmented_rows(images: torch.Tensor, labels: torch.Tensor, args: FinetuneArguments, config, num_labels: int,
                   sizes: torch.Tensor | None = None, crop_fraction: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """`(rows, N, C, H, W)` pictures in [0, 1] and their row titles, for uint8 canvases `images` (and their `sizes`)
    of N training images."""
    train_transform, eval_transform = args.batch_transforms(config, crop_fraction)

    def shown(x):
        return (x * eval_transform.std + eval_transform.mean).clamp(0, 1)

    views = args.repeated_augmentations
    repeated = None if sizes is None else sizes.repeat_interleave(views, dim=0)
    batch = train_transform(images.repeat_interleave(views, dim=0), repeated)  # as a repeated-augmentation batch
    rows = [shown(eval_transform(images, sizes))] + [shown(batch[v::views]) for v in range(views)]
    titles = ["original"] + [f"view {v + 1}" for v in range(views)]
    mixer = args.mixer(num_labels)
    if mixer is not None:
        seed = int(torch.randint(2**62, ()))
        lam, box = mixer.draw(batch.shape[-2], batch.shape[-1], torch.Generator().manual_seed(seed))
        mixed, _ = mixer(batch, labels.repeat_interleave(views), torch.Generator().manual_seed(seed))
        rows.append(shown(mixed[::views]))
        titles.append(f"view 1 + {'cutmix' if box else 'mixup'} {lam:.2f}")
    return torch.stack(rows), titles


def main(argv=None):
    model_args, data_args, args, picture = parse_args(
        (ModelArguments, DataArguments, FinetuneArguments, PictureArguments), argv, description=__doc__)
    if picture.num_images < 1:
        raise UsageError(f"--num_images must be at least 1, got {picture.num_images}.")
    config = build_config(model_args)
    train, _ = load_image_splits(data_args, config.image_size, config.num_channels, require_labels=True,
                                 first=picture.num_images)
    if len(train) < picture.num_images:
        raise ValueError(f"--num_images {picture.num_images}: the training split has only {len(train)} images.")
    set_seed(args.seed)
    images, sizes = train.read(range(len(train)))
    rows, titles = augmented_rows(images, train.labels, args, config, train.num_classes, sizes,
                                  eval_crop_fraction(data_args, config.image_size, train))
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "augmented_batch.png")
    grid_image(rows, titles=titles).save(path)
    print(f"[show_augmentations] {len(titles)} rows x {picture.num_images} images -> {path}")


if __name__ == "__main__":
    run_script(main)
