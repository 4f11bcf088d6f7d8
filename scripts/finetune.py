r"""Fine-tune a pretrained MAE encoder end to end for image classification with the Hugging Face Trainer.

    python scripts/finetune.py --model_name_or_path runs/mae --output_dir runs/mae/finetune
    python scripts/finetune.py --model_name_or_path runs/mae --random_init true --output_dir runs/random/finetune
    python scripts/finetune.py configs/cpu_small_finetune.yaml --model_name_or_path runs/cpu_small \
        --dataset_name ../shared/data/cifar10 --output_dir runs/cpu_small/finetune
    python scripts/finetune.py configs/finetune_strong.yaml --model_name_or_path runs/mae \
        --output_dir runs/mae/finetune_strong

The default recipe: random-resized-crop + flip on the device, warmup + cosine, layer-wise lr decay, label smoothing,
drop path. The strong recipe of configs/finetune_strong.yaml adds RandAugment, mixup + cutmix, random erasing,
repeated augmentation and a weight EMA, all on the device (mae_hf/augment.py).

Writes finetune_results.json and the fine-tuned MAEForImageClassification to --output_dir. Flags: --help.
"""

import os

from transformers import set_seed

from mae_hf import MAEForImageClassification
from mae_hf.cli import UsageError, parse_args, run_script
from mae_hf.data import DataArguments
from mae_hf.loading import ModelArguments, is_classifier, load_classifier, load_pretrained
from mae_hf.metrics import accuracy
from mae_hf.publish import check_hub_access, push_output
from mae_hf.results import architecture, encoder_fingerprint, finetune_protocol, write_results
from mae_hf.runs import Run
from mae_hf.training import ImageTrainer, ThroughputCallback, evaluate_saved, prepare_training
from mae_hf.training_args import FinetuneArguments


def compute_metrics(prediction):
    return {"accuracy": accuracy(prediction.predictions.argmax(-1), prediction.label_ids)}


def evaluate_only(model_args, num_labels, class_names, data, args) -> None:
    """--do_train false: the saved classifier, unchanged, on the evaluation split -> eval_results.json."""
    config, evaluation = data.config, data.evaluation
    if config.num_labels != num_labels:
        raise ValueError(f"--do_train false: {model_args.model_name_or_path} predicts {config.num_labels} classes; "
                         f"this data has {num_labels}.")
    saved = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
    named = class_names and saved != [f"LABEL_{i}" for i in range(config.num_labels)]  # both sides name classes
    if named and saved != class_names:  # the same count in another order would give a meaningless accuracy
        raise ValueError(f"--do_train false: {model_args.model_name_or_path} predicts the classes {saved}, this data "
                         f"has {class_names} (in label order): evaluate it on the data it was trained for.")
    model = load_pretrained(MAEForImageClassification, model_args, config)
    inputs = data.trainer_inputs(args, model.config, labels=True)
    inputs["train_dataset"], inputs["train_transform"] = None, inputs["eval_transform"]  # nothing is trained
    trainer = ImageTrainer(model=model, args=args, compute_metrics=compute_metrics, **inputs)
    evaluate_saved(trainer, model_args, evaluation,
                   lambda metrics: f"eval_accuracy {metrics['eval_accuracy']:.4f} ({len(evaluation)} images)")


def main(argv=None):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, FinetuneArguments), argv,
                                             description=__doc__)
    if not model_args.model_name_or_path and not args.random_init:
        raise UsageError("No --model_name_or_path: pass the pretrained model to fine-tune (e.g. --model_name_or_path "
                         "runs/mae), or --random_init true to fine-tune a randomly initialised encoder (the baseline).")
    if not args.do_train and (args.random_init or not model_args.model_name_or_path):
        raise UsageError("--do_train false evaluates a saved classifier: pass --model_name_or_path (a fine-tuning "
                         "run's folder), without --random_init.")
    check_hub_access(args, model_args)  # --push_to_hub: before any work
    with Run(args) as run:  # holds --output_dir; resolves the resume; stops cleanly on SIGINT/SIGTERM
        finetune(run, model_args, data_args, args)
        push_output(args, model_args)  # inside the lock: no other run writes into the folder being uploaded


def require_classifier(model_args, config) -> None:
    """--do_train false evaluates a saved classifier: known from its config, before any data is read."""
    if not is_classifier(config):
        raise ValueError(f"--do_train false: {model_args.model_name_or_path} is not a classifier (no trained head); "
                         "evaluate a fine-tuning run's folder, or train one first.")


def finetune(run, model_args, data_args, args):
    data = prepare_training(model_args, data_args, args, require_labels=True, check_config=None if args.do_train
                            else lambda config: require_classifier(model_args, config))
    train = data.train
    set_seed(args.seed)  # before the head is initialised
    num_labels = train.num_classes  # the class names when the label column has them: validated at load
    if not args.do_train:
        return evaluate_only(model_args, num_labels, train.class_names, data, args)
    model = load_classifier(model_args, args.random_init, args.seed, num_labels, train.class_names,
                            linear_probe=False, pooling=args.pooling, drop_path_rate=args.drop_path_rate,
                            new_head="the classification head is new and trained here")
    run.check_settings(model.config, data_args, model_args)
    fingerprint = encoder_fingerprint(model.mae)  # the encoder this run starts from, before training changes it
    data.place(args)
    trainer = ImageTrainer(model=model, args=args, compute_metrics=compute_metrics, layer_decay=args.layer_decay,
                           mixer=args.mixer(num_labels), repeated_augmentations=args.repeated_augmentations,
                           ema_decay=args.ema_decay, callbacks=[ThroughputCallback(args.global_batch_size)],
                           **data.trainer_inputs(args, model.config, labels=True))
    run.train(trainer)
    trainer.save_model()
    if trainer.ema is not None and trainer.is_world_process_zero():  # the averaged weights, as a model of their own
        with trainer.ema.applied():
            model.save_pretrained(os.path.join(args.output_dir, "ema"))
    if not args.do_eval:
        print(f"[done] {args.output_dir}: fine-tuned, not evaluated (--do_eval false), so no finetune_results.json",
              flush=True)
        return
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        write_results(args.output_dir, "finetune", {
            "protocol": finetune_protocol(args.recipe()),  # "finetune_strong" with the strong recipe's parts
            "encoder": "random_init" if args.random_init else "pretrained",
            "model_name_or_path": model_args.model_name_or_path,
            "encoder_fingerprint": fingerprint, "architecture": architecture(model.config),
            "eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
            **({"eval_ema_accuracy": metrics["eval_ema_accuracy"], "eval_ema_loss": metrics["eval_ema_loss"],
                "ema_model": "ema"} if trainer.ema is not None else {}),
            **run.record(trainer.state),
            "layer_decay": args.layer_decay, "label_smoothing_factor": args.label_smoothing_factor,
            "drop_path_rate": args.drop_path_rate, "pooling": args.pooling,
            **args.recipe(), **data.record(data_args, args),
        })


if __name__ == "__main__":
    run_script(main)
