"""Assemble a Hub-ready folder from a pretraining run (and optionally its probe and fine-tune runs), fill the model
card with the measured numbers, and push it.

The folder's top level is one checkpoint serving all three Auto classes: the pretrained encoder and decoder plus,
when a probe run is given, the linear-probe head (the probe never changes the encoder, so the encoder is exactly
the pretrained one). A fine-tuned model has its own encoder and goes to `finetuned/`.
"""

import json
import os
import re
import shutil

import torch

from .modeling_mae import MAEForImageClassification, MAEForPreTraining
from .results import (
    NOT_SETTINGS,
    accuracy_rows,
    collect_results,
    encoder_fingerprint,
    results_table,
    unique_results,
)

PICTURES = ("reconstructions.png", "loss_curve.png")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(template: str, values: dict) -> str:
    """Replace every `{{ name }}`; a placeholder without a value is an error, never left in the card."""
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise ValueError(f"model card template: no value for {missing}.")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


def _require_run(folder: str | None, result_file: str, what: str) -> None:
    if folder is None:
        return
    for name in ("config.json", result_file):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{what} {folder}: {name} is missing; expected the output folder of that script.")


def model_index(model_name: str, dataset_id: str, dataset_title: str, results: list[dict]) -> str:
    """The `model-index` YAML block (Hub metadata) with one entry per measured protocol of the pretrained encoder."""
    lines = []
    for title, cells in accuracy_rows(results).items():
        if "pretrained" not in cells:
            continue
        value, result = cells["pretrained"]
        lines += [
            "  - task:",
            "      type: image-classification",
            f"      name: {json.dumps(title)}",
            "    dataset:",
            f"      type: {dataset_id}",
            f"      name: {dataset_title}",
            f"      split: {json.dumps(result.get('eval_split', 'unknown'))}",
            "    metrics:",
            "    - type: accuracy",
            f"      value: {100 * value:.2f}",
            f"      name: {json.dumps(title + ' top-1 accuracy (%)')}",
        ]
    return "\n".join(["model-index:", f"- name: {model_name}", "  results:"] + lines) if lines else ""


def evaluation_text(results: list[dict]) -> str:
    """One line per result file: what it trained and evaluated on and the settings that produced its numbers."""
    lines = []
    for result in results:
        settings = ", ".join(f"{key} {value}" for key, value in sorted(result.items()) if key not in NOT_SETTINGS
                             and not key.startswith("eval_accuracy_") and not key.endswith("_seconds"))
        lines.append(f"- {result['protocol']}, {result.get('encoder', 'pretrained')} encoder: trained on "
                     f"{result.get('train_split')} ({result.get('train_samples')} images), evaluated on "
                     f"{result.get('eval_split')} ({result.get('eval_samples')} images); {settings}.")
    return "\n".join(lines) or "No evaluation results were given."


def check_measured_on(results: list[dict], pretrained, pretrained_dir: str) -> None:
    """Every pretrained-encoder result must have measured this model's encoder: by its weights' fingerprint, or
    (result files written before fingerprints) by the recorded model folder."""
    fingerprint = encoder_fingerprint(pretrained.mae)
    for result in results:
        if result.get("encoder", "pretrained") != "pretrained":
            continue
        if "encoder_fingerprint" in result:
            same = result["encoder_fingerprint"] == fingerprint
        else:
            recorded = result.get("model_name_or_path")
            same = recorded is not None and os.path.realpath(recorded) == os.path.realpath(pretrained_dir)
        if not same:
            measured = result.get("encoder_fingerprint") or f"the model in {result.get('model_name_or_path')}"
            raise ValueError(
                f"{result['source']} measured another encoder ({measured}) than {pretrained_dir} holds "
                f"({fingerprint}); the card would show numbers that do not belong to these weights. Pass only "
                f"results of this model (random-init baselines may come from anywhere).")


def pretraining_text(summary: dict) -> str:
    """The recipe and outcome of the pretraining run, from its `pretraining_summary.json`."""
    precision = "bf16 autocast" if summary.get("bf16") else "fp32"
    decayed = "every parameter" if summary.get("decay_all_parameters") else "linear weights only"
    clipping = ""  # summaries before `max_grad_norm` was recorded leave it unsaid
    if "max_grad_norm" in summary:
        norm = summary["max_grad_norm"]
        clipping = f", gradients clipped at norm {norm:g}" if norm and norm > 0 else ", no gradient clipping"
    images_per_second = summary.get("pipeline_images_per_second")
    rows = [
        ("Data", f"{summary['dataset_name']}: {summary['train_split']} ({summary['train_samples']} images)"),
        ("Epochs / global batch", f"{summary['epochs']:g} / {summary['global_batch_size']}"),
        ("Optimiser", f"AdamW, betas {tuple(summary['adam_betas'])}, peak lr {summary['learning_rate']:.3g}, "
                      f"weight decay {summary['weight_decay']} ({decayed}){clipping}"),
        ("Schedule", f"{summary['lr_scheduler_type']}, warmup {summary['warmup_steps']:g}"),
        ("Augmentation", f"random-resized-crop (area {summary['crop_min_scale']}-1), "
                         f"horizontal flip {summary['horizontal_flip']}"),
        ("Hardware", f"{summary['world_size']} x {summary['device']}, {precision}"),
        ("Training time", f"{summary['train_runtime_seconds']:.0f} s"
                          + (f" ({images_per_second:,.0f} images/s)" if images_per_second else "")),
        ("Final eval loss (masked patches)", f"{summary['eval_loss']:.4f}"),
    ]
    if summary.get("eval_knn_accuracy") is not None:
        rows.append(("kNN accuracy at the end (k=20)", f"{100 * summary['eval_knn_accuracy']:.2f} %"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])
    return f"{table}\n\nCommand: `{summary['command']}`"


def assemble(pretrained_dir: str, output_dir: str, probe_dir: str | None = None, finetune_dir: str | None = None,
             result_paths=(), template_path: str | None = None, model_id: str | None = None,
             dataset_id: str = "uoft-cs/cifar10", dataset_title: str = "CIFAR-10", overwrite: bool = False) -> str:
    """Write the Hub-ready folder. Everything is read, checked and rendered first; only then is anything written
    (or an old folder replaced). Returns the card's path."""
    _require_run(pretrained_dir, "pretraining_summary.json", "pretrained run")
    _require_run(probe_dir, "linear_probe_results.json", "--probe")
    _require_run(finetune_dir, "finetune_results.json", "--finetune")
    for picture in PICTURES:
        if not os.path.isfile(os.path.join(pretrained_dir, picture)):
            raise ValueError(f"{pretrained_dir}/{picture} is missing (scripts/visualize.py draws reconstructions).")
    if template_path is None or not os.path.isfile(template_path):
        raise ValueError(f"model card template {template_path} does not exist.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"--output_dir {output_dir} is not empty; pass --overwrite or choose another folder.")
    target = os.path.realpath(output_dir)
    for source in (pretrained_dir, probe_dir, finetune_dir, *result_paths):
        if source and os.path.commonpath([target, os.path.realpath(source)]) in (target, os.path.realpath(source)):
            raise ValueError(f"--output_dir {output_dir} overlaps the input {source}; choose a separate folder.")

    # The pretrained rows come only from the runs named for this model, so a stray result elsewhere never shows up.
    results = collect_results([os.path.join(probe_dir, name) for name in ("linear_probe_results.json",
                                                                          "knn_results.json")
                               if probe_dir and os.path.isfile(os.path.join(probe_dir, name))]
                              + ([os.path.join(finetune_dir, "finetune_results.json")] if finetune_dir else [])
                              + list(result_paths))
    pretrained = MAEForPreTraining.from_pretrained(pretrained_dir)
    check_measured_on(results, pretrained, pretrained_dir)
    for folder, name, option in ((probe_dir, "linear_probe_results.json", "--probe"),
                                 (finetune_dir, "finetune_results.json", "--finetune")):
        if folder and collect_results([os.path.join(folder, name)])[0].get("encoder") != "pretrained":
            raise ValueError(f"{option} {folder} evaluated a random-init encoder; give the run on {pretrained_dir} "
                             f"(baselines go in --results).")
    results = unique_results(results)  # disagreeing duplicates fail here; agreeing ones are kept once
    probe = MAEForImageClassification.from_pretrained(probe_dir) if probe_dir else None
    if probe is not None:
        encoder = pretrained.mae.state_dict()
        if any(not torch.equal(value, encoder[key]) for key, value in probe.mae.state_dict().items()):
            raise ValueError(f"--probe {probe_dir}: its encoder differs from {pretrained_dir}'s; probe that model.")
    finetuned = MAEForImageClassification.from_pretrained(finetune_dir) if finetune_dir else None
    summary_path = os.path.join(pretrained_dir, "pretraining_summary.json")
    with open(summary_path) as handle:
        summary = json.load(handle)
    card = render_card(template_path, pretrained, summary, results, probe, finetuned is not None,
                       model_id or os.path.basename(target), dataset_id, dataset_title)

    if overwrite and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(os.path.join(output_dir, "results"), exist_ok=True)
    if probe is not None:  # one checkpoint: pretrained encoder and decoder, plus the probe's head
        probe.save_pretrained(output_dir, state_dict={**pretrained.state_dict(), **probe.state_dict()})
    else:
        pretrained.save_pretrained(output_dir)
    if finetuned is not None:
        finetuned.save_pretrained(os.path.join(output_dir, "finetuned"))
    for picture in PICTURES:
        shutil.copy(os.path.join(pretrained_dir, picture), os.path.join(output_dir, picture))
    for index, result in enumerate(results):
        shutil.copy(result["source"], os.path.join(output_dir, "results", f"{index:02d}_{result['protocol']}_"
                                                                           f"{result.get('encoder', 'x')}.json"))
    shutil.copy(summary_path, os.path.join(output_dir, "results", "pretraining_summary.json"))
    card_path = os.path.join(output_dir, "README.md")
    with open(card_path, "w") as handle:
        handle.write(card)
    return card_path


def render_card(template_path: str, pretrained, summary: dict, results: list[dict], probe, has_finetuned: bool,
                model_id: str, dataset_id: str, dataset_title: str) -> str:
    """`model_card.md` filled from the model, the pretraining summary and the result files."""
    config = pretrained.config
    head_description = "no classification head (the classifier class adds an untrained one)"
    if probe is not None:
        labels = probe.config.id2label
        head_description = (f"a linear-probe head over {probe.config.num_labels} classes "
                            f"({', '.join(labels[i] for i in range(probe.config.num_labels))})")
    finetuned_note = ("- `finetuned/`: the fine-tuned classifier (its own encoder); load it with "
                      "`subfolder=\"finetuned\"`.\n") if has_finetuned else ""
    eval_splits = sorted({r["eval_split"] for r in results if r.get("eval_split")})
    with open(template_path) as handle:
        template = handle.read()
    model_name = model_id.split("/")[-1]
    return render(template, {
        "model_id": model_id,
        "model_name": model_name,
        "dataset_id": dataset_id,
        "dataset_title": dataset_title,
        "model_index": model_index(model_name, dataset_id, dataset_title, results),
        "head_description": head_description,
        "finetuned_note": finetuned_note,
        "parameters": f"{sum(p.numel() for p in pretrained.parameters()) / 1e6:.2f} M",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_patches": config.num_patches,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "decoder_num_hidden_layers": config.decoder_num_hidden_layers,
        "decoder_hidden_size": config.decoder_hidden_size,
        "decoder_num_attention_heads": config.decoder_num_attention_heads,
        "mask_ratio": config.mask_ratio,
        "target": "per-patch normalised pixels (norm_pix_loss)" if config.norm_pix_loss else "raw (normalised) pixels",
        "pretraining": pretraining_text(summary),
        "eval_split": " / ".join(f"`{split}`" for split in eval_splits) or "the evaluation split",
        "results_table": results_table(results) if results else "No evaluation results were given.",
        "evaluation": evaluation_text(results),
    })


def push(output_dir: str, repo_id: str, private: bool = False) -> str:
    """Upload the folder to the Hub; on failure the local folder stays complete and the error says what to do."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=output_dir, repo_id=repo_id).commit_url
    except Exception as error:
        raise RuntimeError(
            f"Pushing to the Hub failed ({type(error).__name__}: {error}). The folder {output_dir} is complete: "
            f"upload it later with `hf upload {repo_id} {output_dir}` (log in first with `hf auth login`)."
        ) from error
