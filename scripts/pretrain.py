"""Pretrain a masked autoencoder on images with the Hugging Face Trainer.

    python scripts/pretrain.py --output_dir runs/mae                        # GPU default: CIFAR-10, 320 epochs
    python scripts/pretrain.py configs/cpu_small.yaml --output_dir runs/cpu  # a few minutes on a CPU
    python scripts/pretrain.py configs/reference.yaml --output_dir runs/ref  # the reference recipe
    torchrun --nproc_per_node 2 scripts/pretrain.py --output_dir runs/ddp   # several GPUs (DDP)

The output folder loads with `AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)` and holds
reconstructions.png, loss_curve.png, train_results.json and eval_results.json. Flags: --help.
"""

import os

from transformers import set_seed

from mae_hf import MAEForPreTraining
from mae_hf.cli import UsageError, parse_args, run_script
from mae_hf.data import DataArguments, fixed_noise
from mae_hf.data.prepared import prepared_source
from mae_hf.inputs import read_json_object, write_json
from mae_hf.loading import ModelArguments, load_pretrained
from mae_hf.publish import check_hub_access, push_output
from mae_hf.redaction import recorded_command
from mae_hf.results import software_versions
from mae_hf.runs import Run
from mae_hf.training import MAEPretrainer, ThroughputCallback, evaluate_saved, prepare_training
from mae_hf.training_args import PretrainingArguments


def slow_hint(data_args) -> str:
    return ("This run is sized for a GPU, not a CPU. On a CPU, pretrain the small config instead: python "
            f"scripts/pretrain.py configs/cpu_small.yaml {data_args.command_flags()} --output_dir runs/cpu_small")


def final_evaluation(trainer) -> dict:
    """The final step's evaluation: the Trainer's own if it ran one there and kept the last step's model, else new."""
    if trainer.args.load_best_model_at_end:
        return trainer.evaluate()
    logged = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == trainer.state.global_step:
            logged.update({key: value for key, value in entry.items() if key.startswith("eval_")})
    return logged if "eval_loss" in logged else trainer.evaluate()


def main(argv=None):
    model_args, data_args, args = parse_args((ModelArguments, DataArguments, PretrainingArguments), argv,
                                             description=__doc__)
    check_hub_access(args, model_args)  # --push_to_hub: before any work
    if not args.do_train and not model_args.model_name_or_path:
        raise UsageError("--do_train false evaluates a saved model: pass --model_name_or_path (a pretraining run's "
                         "folder).")
    with Run(args) as run:  # holds --output_dir; resolves the resume; stops cleanly on SIGINT/SIGTERM
        pretrain(run, model_args, data_args, args)
        push_output(args, model_args)  # inside the lock: no other run writes into the folder being uploaded


def check_knn_bank(args, labels) -> None:
    """The kNN monitor needs more labelled training images than neighbours, or its accuracy means nothing."""
    if not args.knn_eval or labels is None:
        return
    bank = int((labels >= 0).sum())
    if args.knn_max_train_samples is not None:
        bank = min(bank, args.knn_max_train_samples)
    if 0 < bank < args.knn_k:
        raise ValueError(f"The kNN monitor's bank has {bank} labelled training images, fewer than --knn_k "
                         f"{args.knn_k} neighbours: its accuracy would mean nothing. Pass --knn_k {max(1, bank // 4)} "
                         "or less, more training images, or --knn_eval false.")


def knn_monitor_data(args, train, evaluation):
    """(bank, bank labels, queries, query labels) of the kNN monitor over labelled images only (-1 / None mean
    "unlabelled" here), the bank drawn at random when --knn_max_train_samples caps it; None without labels."""
    if not args.knn_eval or train.labels is None:
        return None
    bank, queries = train.labelled(), evaluation.labelled()
    if len(bank) < len(train) or len(queries) < len(evaluation):
        print(f"[data] unlabelled images (label -1 or None): {len(train) - len(bank)} of {len(train)} training, "
              f"{len(evaluation) - len(queries)} of {len(evaluation)} evaluation. They are pretrained on and left "
              "out of the kNN monitor" + ("" if len(bank) and len(queries) else
                                          "; with no labelled images in a split, there is no kNN monitor") + ".",
              flush=True)
    if not (len(bank) and len(queries)):
        return None
    bank = bank.sample(args.knn_max_train_samples, seed=args.seed)
    return bank, bank.labels, queries, queries.labels


def pretrain(run, model_args, data_args, args):
    set_seed(args.seed)  # before the model is initialised
    data = prepare_training(model_args, data_args, args, check=lambda train, _: check_knn_bank(args, train.labels),
                            norm_pix_loss=True)
    config, train, evaluation = data.config, data.train, data.evaluation
    run.check_settings(config, data_args, model_args)
    data.place(args)
    eval_noise = fixed_noise(len(evaluation), config.num_patches, seed=args.seed)
    knn_data = knn_monitor_data(args, train, evaluation)
    shown = range(min(args.num_reconstructions, len(evaluation)))
    preview = (*evaluation.read(shown), eval_noise[:len(shown)])

    if model_args.model_name_or_path:
        model = load_pretrained(MAEForPreTraining, model_args, config)
    else:
        model = MAEForPreTraining(config)
    throughput = ThroughputCallback(args.global_batch_size, slow_hint=slow_hint(data_args))
    trainer = MAEPretrainer(model=model, args=args, callbacks=[throughput], preview=preview, knn_data=knn_data,
                            knn_k=args.knn_k, **data.trainer_inputs(args, config, labels=False, eval_noise=eval_noise))
    if not args.do_train:  # --do_train false: evaluate the saved model only, as transformers' run_mae.py
        def scores(metrics: dict) -> str:
            knn = metrics.get("eval_knn_accuracy")
            return f"eval_loss {metrics['eval_loss']:.4f}" + ("" if knn is None else f", kNN accuracy {knn:.4f}")

        return evaluate_saved(trainer, model_args, evaluation, scores)
    result = run.train(trainer)

    trainer.save_model()
    if result.metrics:
        train_metrics = run.train_metrics(dict(result.metrics, pipeline_images_per_second=throughput.images_per_second,
                                               train_samples=len(train)))
        trainer.save_metrics("train", train_metrics)
    else:  # a resumed run with nothing left to train: the run's own train results stay, and the summary keeps them
        kept = os.path.join(args.output_dir, "train_results.json")
        train_metrics = read_json_object(kept) if os.path.isfile(kept) else {}
    eval_metrics = final_evaluation(trainer) if args.do_eval else {}
    if args.do_eval:
        trainer.save_metrics("eval", dict(eval_metrics, eval_samples=len(evaluation)))
    trainer.save_state()
    if trainer.is_world_process_zero():
        prepared_from = prepared_source(data_args.dataset_name)
        summary = {
            **data.record(data_args, args), "class_names": train.class_names, **run.record(trainer.state),
            "data_in_memory": train.in_memory, "dataloader_num_workers": args.dataloader_num_workers,
            "data": data_args.recorded(),  # every data flag: visualize.py and the card read the run's own data
            **({"prepared_from": prepared_from} if prepared_from else {}),
            "decay_all_parameters": args.decay_all_parameters, "max_grad_norm": args.max_grad_norm,
            "adam_betas": [args.adam_beta1, args.adam_beta2], "mask_ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss, "world_size": args.world_size, "torch_compile": args.torch_compile,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_runtime_seconds": train_metrics.get("train_runtime"),
            "pipeline_images_per_second": train_metrics.get("pipeline_images_per_second"),
            "eval_loss": eval_metrics.get("eval_loss"), "eval_knn_accuracy": eval_metrics.get("eval_knn_accuracy"),
            "command": recorded_command(),  # tokens redacted
            "versions": software_versions(),
        }
        write_json(os.path.join(args.output_dir, "pretraining_summary.json"), summary)
        loss, knn, speed = summary["eval_loss"], summary["eval_knn_accuracy"], summary["pipeline_images_per_second"]
        evaluated = (f"eval_loss {loss:.4f}, kNN accuracy "
                     f"{'n/a (no labels or --knn_eval false)' if knn is None else f'{knn:.4f}'}"
                     if args.do_eval else "not evaluated (--do_eval false)")
        print(f"[done] {args.output_dir}: {evaluated}, "
              f"{'images/s not measured (too few steps)' if speed is None else f'{speed:,.0f} images/s'}", flush=True)


if __name__ == "__main__":
    run_script(main)
