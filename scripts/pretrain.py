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

from transformers import set_seed

from mae_hf import MAEForPreTraining
from mae_hf.cli import parse_args
from mae_hf.data import ArrayDataset, BatchTransform, DataArguments, collate, fixed_noise, load_image_splits
from mae_hf.training import (
    ImageTrainingArguments,
    MAEPretrainer,
    ModelArguments,
    NonFiniteLossError,
    check_output_dir,
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


def main(argv=None):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, PretrainingArguments), argv,
                                             description=__doc__)
    check_output_dir(args)
    if not 0 < args.crop_min_scale <= 1:
        sys.exit(f"error: --crop_min_scale must lie in (0, 1], got {args.crop_min_scale}.")
    set_seed(args.seed)  # before the model is initialised
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
                         train_samples=len(train))
    trainer.save_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    trainer.save_metrics("eval", dict(eval_metrics, eval_samples=len(evaluation)))
    trainer.save_state()
    if trainer.is_world_process_zero():
        summary = {
            "dataset_name": data_args.dataset_name, "train_split": train.split, "eval_split": evaluation.split,
            "train_samples": len(train), "eval_samples": len(evaluation), "epochs": args.num_train_epochs,
            "global_batch_size": world_batch, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
            "adam_betas": [args.adam_beta1, args.adam_beta2], "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "warmup_steps": args.warmup_steps, "crop_min_scale": args.crop_min_scale,
            "horizontal_flip": args.horizontal_flip, "mask_ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss, "seed": args.seed, "device": str(args.device),
            "world_size": args.world_size, "bf16": args.bf16, "torch_compile": args.torch_compile,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_runtime_seconds": result.metrics.get("train_runtime"),
            "pipeline_images_per_second": throughput.images_per_second,
            "eval_loss": eval_metrics.get("eval_loss"), "eval_knn_accuracy": eval_metrics.get("eval_knn_accuracy"),
            "command": " ".join(["python"] + sys.argv),
        }
        with open(os.path.join(args.output_dir, "pretraining_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"[done] {args.output_dir}: eval_loss {summary['eval_loss']:.4f}, kNN accuracy "
              f"{summary['eval_knn_accuracy']}, {summary['pipeline_images_per_second'] or 0:,.0f} images/s",
              flush=True)


if __name__ == "__main__":
    main()
