"""Fine-tune a pretrained MAE encoder end to end for image classification with the Hugging Face Trainer
(random-resized-crop + flip on the device, warmup + cosine, layer-wise lr decay, label smoothing, drop path).

    python scripts/finetune.py --model_name_or_path runs/mae --output_dir runs/mae/finetune
    python scripts/finetune.py --model_name_or_path runs/mae --random_init true --output_dir runs/random/finetune
    python scripts/finetune.py configs/cpu_small_finetune.json --model_name_or_path runs/cpu_small \
        --dataset_name ../shared/data/cifar10 --output_dir runs/cpu_small/finetune

Writes finetune_results.json and the fine-tuned MAEForImageClassification to --output_dir. Flags: --help.
"""

import sys
from dataclasses import dataclass, field

from transformers import set_seed

from mae_hf.cli import parse_args
from mae_hf.data import ArrayDataset, BatchTransform, DataArguments, collate, load_image_splits
from mae_hf.evaluation import load_classifier
from mae_hf.metrics import accuracy
from mae_hf.results import write_results
from mae_hf.training import (
    ImageTrainer,
    ImageTrainingArguments,
    ModelArguments,
    NonFiniteLossError,
    build_config,
    check_output_dir,
)


@dataclass
class FinetuneArguments(ImageTrainingArguments):
    """The MAE paper's fine-tuning recipe (Table 9) without mixup/cutmix/RandAugment, scaled to CIFAR-10."""

    random_init: bool = field(default=False, metadata={"help": "Fine-tune a randomly initialised encoder instead."})
    pooling: str = field(default="mean", metadata={"help": "'mean' of patch tokens (MAE paper) or 'cls'."})
    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise lr decay (1 disables)."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the encoder."})
    crop_min_scale: float = field(default=0.25, metadata={"help": "Random-resized-crop area range [min, 1]."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    base_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate per 256 images of batch."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Batch per device."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch per device."})
    num_train_epochs: float = field(default=100, metadata={"help": "Epochs."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (linear weights only)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warmup."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup: steps, or a fraction of all steps if < 1."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (fraction if < 1)."})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps (fraction if < 1)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=0.01, metadata={"help": "Log every N steps (fraction if < 1)."})


def compute_metrics(prediction):
    return {"accuracy": accuracy(prediction.predictions.argmax(-1), prediction.label_ids)}


def main(argv=None):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, FinetuneArguments), argv,
                                             description=__doc__)
    check_output_dir(args)
    random_init = args.random_init or not model_args.model_name_or_path
    try:
        image_size = build_config(model_args).image_size
        train, evaluation = load_image_splits(data_args, image_size, require_labels=True)
    except ValueError as error:
        sys.exit(f"error: {error}")
    set_seed(args.seed)  # before the head is initialised
    num_labels = int(max(train.labels.max(), evaluation.labels.max())) + 1
    names = train.class_names or [str(i) for i in range(num_labels)]
    model = load_classifier(model_args, random_init, args.seed, num_labels=num_labels,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                            linear_probe=False, pooling=args.pooling, drop_path_rate=args.drop_path_rate)
    train_set = ArrayDataset(train.images, labels=train.labels)
    if args.place_data_on_device(train.images.numel()):
        train_set.to(args.device)
        args.dataloader_pin_memory = False
    crop = (args.crop_min_scale, 1.0) if args.crop_min_scale < 1 else None
    trainer = ImageTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=ArrayDataset(evaluation.images, labels=evaluation.labels),
        data_collator=collate,
        compute_metrics=compute_metrics,
        train_transform=BatchTransform.for_model(model.config, crop_scale=crop, hflip=args.horizontal_flip),
        eval_transform=BatchTransform.for_model(model.config),
        layer_decay=args.layer_decay,
    )
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except NonFiniteLossError as error:
        sys.exit(f"error: {error}")
    trainer.save_model()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        write_results(args.output_dir, "finetune", {
            "protocol": "finetune",
            "encoder": "random_init" if random_init else "pretrained",
            "model_name_or_path": model_args.model_name_or_path,
        "dataset_name": data_args.dataset_name,
        "train_split": train.split,
        "eval_split": evaluation.split,
        "train_samples": len(train),
            "eval_samples": len(evaluation),
            "eval_accuracy": metrics["eval_accuracy"],
            "eval_loss": metrics["eval_loss"],
            "epochs": args.num_train_epochs,
            "learning_rate": args.learning_rate,
            "layer_decay": args.layer_decay,
            "label_smoothing_factor": args.label_smoothing_factor,
            "drop_path_rate": args.drop_path_rate,
            "pooling": args.pooling,
            "crop_min_scale": args.crop_min_scale,
            "seed": args.seed,
        })


if __name__ == "__main__":
    main()
