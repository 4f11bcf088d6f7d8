"""Pretrain a masked autoencoder on images with the Hugging Face Trainer.

    python scripts/pretrain.py --output_dir runs/mae                        # GPU default: CIFAR-10, 320 epochs
    python scripts/pretrain.py configs/cpu_small.json --output_dir runs/cpu  # a few minutes on a CPU
    python scripts/pretrain.py configs/reference.json --output_dir runs/ref  # the reference recipe
    torchrun --nproc_per_node 2 scripts/pretrain.py --output_dir runs/ddp   # several GPUs (DDP)

The output folder loads with `AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)` and holds
reconstructions.png, loss_curve.png, train_results.json and eval_results.json. Flags: --help.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from mae_hf import MAEForPreTraining
from mae_hf.cli import parse_args
from mae_hf.data import ArrayDataset, BatchTransform, DataArguments, collate, fixed_noise, load_image_splits
from mae_hf.training import (
    ImageTrainingArguments,
    MAEPretrainer,
    ModelArguments,
    NonFiniteLossError,
    ThroughputCallback,
    build_config,
)

SLOW_HINT = ("This is the GPU-sized default. On a CPU, pretrain the small config instead: "
             "python scripts/pretrain.py configs/cpu_small.json --output_dir runs/cpu_small")


@dataclass
class PretrainingArguments(ImageTrainingArguments):
    """The MAE paper's recipe (He et al. 2021, Table 8), scaled to CIFAR-10."""

    per_device_train_batch_size: int = field(default=512, metadata={"help": "Batch per device."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch per device."})
    num_train_epochs: float = field(default=320, metadata={"help": "Epochs."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (linear weights only)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warmup."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup: steps, or a fraction of all steps if < 1."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (fraction if < 1)."})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps (fraction if < 1)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=0.01, metadata={"help": "Log every N steps (fraction if < 1)."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["pixel_values"], metadata={"help": "The MAE's target is its input."})
    crop_min_scale: float = field(
        default=0.2, metadata={"help": "Random-resized-crop area range [crop_min_scale, 1]; 1 disables cropping."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    knn_eval: bool = field(default=True, metadata={"help": "kNN accuracy (k=--knn_k) at each evaluation, if labels."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN evaluation."})
    knn_max_train_samples: int | None = field(
        default=None, metadata={"help": "Training images in the kNN bank (all by default)."})
    num_reconstructions: int = field(default=8, metadata={"help": "Images in reconstructions.png."})


def check_output_dir(args: PretrainingArguments) -> None:
    """Refuse to start over a previous run unless asked to resume it (nothing is overwritten silently)."""
    if args.output_dir is None:
        sys.exit("error: --output_dir is required (where the model, pictures and results go).")
    if args.resume_from_checkpoint is None and os.path.isdir(args.output_dir):
        leftovers = [n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-") or n == "config.json"]
        if leftovers:
            sys.exit(f"error: {args.output_dir} already holds a run ({', '.join(sorted(leftovers)[:3])}). Continue it "
                     "with --resume_from_checkpoint last (or a checkpoint folder), or choose another --output_dir.")
    if args.resume_from_checkpoint == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            sys.exit(f"error: --resume_from_checkpoint last: no checkpoint-* folder in {args.output_dir}.")
        args.resume_from_checkpoint = last
    elif args.resume_from_checkpoint is not None and not os.path.isdir(args.resume_from_checkpoint):
        sys.exit(f"error: --resume_from_checkpoint {args.resume_from_checkpoint}: no such folder.")


def main(argv=None):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, PretrainingArguments), argv,
                                             description=__doc__)
    check_output_dir(args)
    if not 0 < args.crop_min_scale <= 1:
        sys.exit(f"error: --crop_min_scale must lie in (0, 1], got {args.crop_min_scale}.")
    config = build_config(model_args, norm_pix_loss=True)
    train, evaluation = load_image_splits(data_args, config.image_size, config.num_channels)

    has_labels = train.labels is not None
    train_set = ArrayDataset(train.images)
    if args.place_data_on_device(train.images.numel()):
        train_set.to(args.device)
        args.dataloader_pin_memory = False
    eval_noise = fixed_noise(len(evaluation), config.num_patches, seed=args.seed)
    eval_set = ArrayDataset(evaluation.images, noise=eval_noise)
    knn_data = None
    if args.knn_eval and has_labels:
        bank = slice(0, args.knn_max_train_samples)
        knn_data = (train.images[bank], train.labels[bank], evaluation.images, evaluation.labels)
    preview = (evaluation.images[:args.num_reconstructions], eval_noise[:args.num_reconstructions])

    if model_args.model_name_or_path:
        model = MAEForPreTraining.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = MAEForPreTraining(config)
    crop = (args.crop_min_scale, 1.0) if args.crop_min_scale < 1 else None
    world_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    throughput = ThroughputCallback(world_batch, slow_hint=SLOW_HINT)
    trainer = MAEPretrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collate,
        train_transform=BatchTransform.for_model(config, crop_scale=crop, hflip=args.horizontal_flip),
        eval_transform=BatchTransform.for_model(config),
        callbacks=[throughput],
        preview=preview,
        knn_data=knn_data,
        knn_k=args.knn_k,
    )
    try:
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except NonFiniteLossError as error:
        sys.exit(f"error: {error}")

    trainer.save_model()
    train_metrics = dict(result.metrics, pipeline_images_per_second=throughput.images_per_second,
                         train_samples=len(train), parameters=sum(p.numel() for p in model.parameters()))
    trainer.save_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    trainer.save_metrics("eval", dict(eval_metrics, eval_samples=len(evaluation)))
    trainer.save_state()
    if trainer.is_world_process_zero():
        summary = {key: eval_metrics[key] for key in ("eval_loss", "eval_knn_accuracy") if key in eval_metrics}
        print(f"[done] {args.output_dir}: {json.dumps(summary)}; "
              f"{train_metrics['pipeline_images_per_second'] or 0:,.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
