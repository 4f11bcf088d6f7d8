"""Assemble a Hub-ready folder from a pretraining run (and optionally its probe and fine-tune runs), fill the model
card with the measured numbers, optionally add the demo app (a Space), and push it (`hub_preflight` before any work,
`push` at the end; pretrain.py and finetune.py use the same two). The folder's layout: docs/publishing.md.
"""

import json
import mmap
import os
import re
import shutil

import torch

from .cli import MAEHFError, UsageError
from .inputs import read_json_object, weight_shapes, write_json
from .loading import ModelArguments
from .modeling_mae import MAEForImageClassification, MAEForPreTraining
from .redaction import redact
from .results import (
    NOT_SETTINGS,
    TITLES,
    accuracy_rows,
    collect_results,
    encoder_fingerprint,
    folder_name,
    is_local_dataset,
    results_table,
    same_dataset,
    unique_results,
)
from .runs import LOCK_NAME, segment_totals

PICTURES = ("reconstructions.png", "loss_curve.png")
DATASET_TITLES = {"uoft-cs/cifar10": "CIFAR-10", "cifar10": "CIFAR-10"}
# The Space: the demo app, its requirements and examples, and the package files the app loads by path (neither
# imports mae_hf, so they run next to the app without the package).
SPACE_FILES = ("app.py", "requirements.txt", "examples")
PACKAGE_FILES_FOR_SPACE = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
                                for name in ("visualize.py", "precision.py"))
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class HubPushError(MAEHFError, RuntimeError):
    """The upload failed; the local folder is complete."""


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
    """Every pretrained-encoder result must have measured this model's encoder (fingerprint, or else model folder)."""
    fingerprint = encoder_fingerprint(pretrained.mae)
    for result in results:
        if result.get("encoder", "pretrained") != "pretrained":
            continue
        recorded = result.get("model_name_or_path")
        same = (result["encoder_fingerprint"] == fingerprint if "encoder_fingerprint" in result else
                recorded is not None and os.path.realpath(recorded) == os.path.realpath(pretrained_dir))
        if not same:
            measured = result.get("encoder_fingerprint") or f"the model in {result.get('model_name_or_path')}"
            raise ValueError(
                f"{result['source']} measured another encoder ({measured}) than {pretrained_dir} holds "
                f"({fingerprint}); the card would show numbers that do not belong to these weights. Pass only "
                f"results of this model (random-init baselines may come from anywhere).")


def resolve_dataset_id(summary: dict, dataset_id: str | None) -> str | None:
    """The Hub dataset the card names: the run's own Hub id (for a prepared folder, the one it was prepared from), or
    for local data `dataset_id`, the user's word that it is a copy of it; None: local data described by its folder.
    A `dataset_id` that contradicts the run's Hub id is an error."""
    trained_on = summary["dataset_name"]
    source = (summary.get("prepared_from") or {}).get("dataset_name")
    if is_local_dataset(trained_on) and source and not is_local_dataset(source):
        trained_on = source  # a folder prepared from a Hub dataset: that dataset
    if is_local_dataset(trained_on):
        return dataset_id
    if dataset_id and dataset_id != trained_on and DATASET_TITLES.get(dataset_id, dataset_id) != \
            DATASET_TITLES.get(trained_on, trained_on):
        raise ValueError(f"--dataset_id {dataset_id}: the run was pretrained on the Hub dataset {trained_on}; the "
                         f"card must name that one (leave --dataset_id out).")
    return dataset_id or trained_on


def dataset_title(summary: dict, dataset_id: str | None, dataset_source: str | None = None) -> str:
    """The data's name in the card's text: the Hub dataset's title, else the local folder's (+ `dataset_source`)."""
    if dataset_id:
        return DATASET_TITLES.get(dataset_id, dataset_id)
    return f"the local dataset `{folder_name(summary['dataset_name'])}`" + (
        f" ({dataset_source})" if dataset_source else "")


def data_description(summary: dict, dataset_id: str | None) -> str:
    """The data row: the Hub dataset (and the local copy the run read), the training images."""
    trained_on = summary["dataset_name"]
    prepared = " prepared" if summary.get("prepared_from") else ""
    if dataset_id is None:
        where = f"a local{prepared} dataset at `{trained_on}` (not on the Hub)"
    else:
        where = (f"{dataset_id} (local{prepared} copy at `{trained_on}`)" if is_local_dataset(trained_on)
                 else dataset_id)
    return f"{where}: {summary['train_split']} ({summary['train_samples']:,} images)"


def evaluation_data(summary: dict) -> str:
    """The images the run evaluated on: a separate folder, a separate split, or a held-out part of the training ones."""
    split, count = summary["eval_split"], f"{summary['eval_samples']:,} images"
    validation_dir = (summary.get("data") or {}).get("validation_dir")
    if validation_dir:
        return f"the separate folder `{folder_name(validation_dir)}` ({count}, given as --validation_dir)"
    if " held out" in split:  # a held-out part of the training split, as `select_splits` names it
        return f"a held-out part of the training images ({split}; {count}), not a separate test set"
    return f"the `{split}` split, separate from the training images ({count})"


def check_same_dataset(results: list[dict], summary: dict) -> None:
    """The card describes one dataset: every result must be measured on the data the model was pretrained on."""
    for result in results:
        name = result.get("dataset_name")
        if name and not same_dataset(summary["dataset_name"], name, summary.get("prepared_from")):
            raise ValueError(
                f"{result['source']} was measured on {name}, but the model was pretrained on "
                f"{summary['dataset_name']}: the card describes one dataset. Pass results measured on "
                f"{summary['dataset_name']} (or a copy of it), and report the others separately (compare.py).")


def pretraining_text(summary: dict, dataset_id: str) -> str:
    """The recipe and outcome of the pretraining run, from its `pretraining_summary.json`."""
    def named(bf16) -> str:
        return "bf16 autocast" if bf16 else "fp32"

    precision = named(summary.get("bf16"))
    changes = [(resume["step"], resume["changed"]["recipe.bf16"]) for resume in summary.get("resumes") or []
               if "recipe.bf16" in (resume.get("changed") or {})]  # accepted with --allow_config_change
    if changes:
        precision = ", ".join([named(changes[0][1]["checkpoint"])]
                              + [f"{named(change['now'])} from step {step}" for step, change in changes])
    device = str(summary["device"])  # "2 x cuda" as results record it now; older ones: "cuda:0" and a world size
    device = device if " x " in device else f"{summary.get('world_size', 1)} x {device}"
    decayed = "every parameter" if summary.get("decay_all_parameters") else "linear weights only"
    norm = summary.get("max_grad_norm")  # summaries before it was recorded leave clipping unsaid
    clipping = ("" if "max_grad_norm" not in summary else
                f", gradients clipped at norm {norm:g}" if norm and norm > 0 else ", no gradient clipping")
    rows = [
        ("Data", data_description(summary, dataset_id)),
        ("Evaluation data", evaluation_data(summary)),
        ("Epochs / global batch", f"{summary['epochs']:g} / {summary['global_batch_size']}"),
        ("Optimiser", f"AdamW, betas {tuple(summary['adam_betas'])}, peak lr {summary['learning_rate']:.3g}, "
                      f"weight decay {summary['weight_decay']} ({decayed}){clipping}"),
        ("Schedule", f"{summary['lr_scheduler_type']}, warmup {summary['warmup_steps']:g}"),
        ("Augmentation", f"random-resized-crop (area {summary['crop_min_scale']}-1), "
                         f"horizontal flip {summary['horizontal_flip']}"),
        ("Hardware", f"{device}, {precision}"),
        ("Training time", training_time(summary)),
        ("Final eval loss (masked patches)", f"{summary['eval_loss']:.4f}"),
    ]
    if summary.get("versions"):  # summaries before versions were recorded leave it unsaid
        rows.append(("Software", ", ".join(f"{name} {version}" for name, version in summary["versions"].items())))
    if summary.get("eval_knn_accuracy") is not None:
        rows.append(("kNN accuracy at the end (k=20)", f"{100 * summary['eval_knn_accuracy']:.2f} %"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])
    return f"{table}\n\n{commands(summary)}"


def training_time(summary: dict) -> str:
    """The run's training time and images over all its segments, and the speed measured in its last one."""
    segments = summary.get("segments") or []
    seconds, images = segment_totals(segments) if segments else (summary.get("train_runtime_seconds"), None)
    speed = summary.get("pipeline_images_per_second")
    text = "not recorded" if seconds is None else f"{seconds:.0f} s"
    if images is not None:
        text += f" for {images:,} images"
    if len(segments) > 1:
        text += (f" in {len(segments)} segments (stopped and resumed at step "
                 f"{', '.join(str(segment['steps'][0]) for segment in segments[1:])}; the steps after a segment's "
                 "last checkpoint were trained again and are not counted)")
    if speed:
        text += f"; {speed:,.0f} images/s through data loading and training steps" + (
            " (measured after the last resume)" if len(segments) > 1 else "")
    return text


def commands(summary: dict) -> str:
    """The command that started the run and each one that resumed it, with the steps it trained."""
    segments = summary.get("segments") or []
    if len(segments) < 2:
        return f"Command: `{summary['command']}`"
    lines = ["Commands:"]
    for index, segment in enumerate(segments):
        first, last = segment["steps"]
        what = "started" if index == 0 else f"resumed from step {first}"
        command = f"`{segment['command']}`" if segment["command"] else "(not recorded)"
        lines.append(f"- {what}, trained to step {last}: {command}")
    return "\n".join(lines)


def assemble(pretrained_dir: str, output_dir: str, probe_dir: str | None = None, finetune_dir: str | None = None,
             result_paths=(), template_path: str | None = None, model_id: str | None = None,
             dataset_id: str | None = None, overwrite: bool = False, space_dir: str | None = None,
             dataset_source: str | None = None) -> str:
    """Write the Hub-ready folder, after everything is read, checked and rendered; returns the card's path.
    `model_id`: what the card's code loads (default: the folder's path); `dataset_id`: the Hub dataset a local copy
    is of, `dataset_source`: where local data without one came from; `space_dir`: the demo folder to add."""
    runs = ((pretrained_dir, "pretraining_summary.json", "pretrained run"),
            (probe_dir, "linear_probe_results.json", "--probe"), (finetune_dir, "finetune_results.json", "--finetune"))
    for folder, result_file, option in runs:
        for name in ("config.json", result_file):
            if folder is not None and not os.path.isfile(os.path.join(folder, name)):
                raise ValueError(f"{option} {folder}: {name} is missing; expected the output folder of that script.")
    for folder, _, option in runs:
        if folder is not None:
            weight_shapes(folder, option)  # missing, truncated or garbage weights: named, before any loading
    for picture in PICTURES:
        if not os.path.isfile(os.path.join(pretrained_dir, picture)):
            raise ValueError(f"{pretrained_dir}/{picture} is missing (scripts/visualize.py draws reconstructions).")
    if template_path is None or not os.path.isfile(template_path):
        raise ValueError(f"model card template {template_path} does not exist.")
    space_metadata = space_check(space_dir) if space_dir else ""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file; expected a folder (new or empty) to assemble into.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UsageError(f"--output_dir {output_dir} is not empty; pass --overwrite or choose another folder.")
    target = os.path.realpath(output_dir)
    for source in (pretrained_dir, probe_dir, finetune_dir, *result_paths):
        if source and os.path.commonpath([target, os.path.realpath(source)]) in (target, os.path.realpath(source)):
            raise UsageError(f"--output_dir {output_dir} overlaps the input {source}; choose a separate folder.")

    # The pretrained rows come only from the runs named for this model, so a stray result elsewhere never shows up.
    results = collect_results([os.path.join(probe_dir, name) for name in ("linear_probe_results.json",
                                                                          "knn_results.json")
                               if probe_dir and os.path.isfile(os.path.join(probe_dir, name))]
                              + ([os.path.join(finetune_dir, "finetune_results.json")] if finetune_dir else [])
                              + list(result_paths))
    pretrained = MAEForPreTraining.from_pretrained(pretrained_dir)
    check_measured_on(results, pretrained, pretrained_dir)
    for folder, name, option in runs[1:]:
        if folder and collect_results([os.path.join(folder, name)])[0].get("encoder") != "pretrained":
            raise ValueError(f"{option} {folder} evaluated a random-init encoder; give the run on {pretrained_dir} "
                             f"(baselines go in --results).")
    results = [redact(result) for result in unique_results(results)]  # disagreeing duplicates fail here
    probe = MAEForImageClassification.from_pretrained(probe_dir) if probe_dir else None
    if probe is not None:
        encoder = pretrained.mae.state_dict()
        if any(not torch.equal(value, encoder[key]) for key, value in probe.mae.state_dict().items()):
            raise ValueError(f"--probe {probe_dir}: its encoder differs from {pretrained_dir}'s; probe that model.")
    finetuned = MAEForImageClassification.from_pretrained(finetune_dir) if finetune_dir else None
    # a summary written before tokens were redacted may hold one
    summary = redact(read_json_object(os.path.join(pretrained_dir, "pretraining_summary.json")))
    dataset_id = resolve_dataset_id(summary, dataset_id)
    check_same_dataset(results, summary)
    if dataset_id is None:
        print(f"note: the run read the local dataset {summary['dataset_name']}: the card describes it by its folder "
              "and names no Hub dataset in its metadata (no model-index); --dataset_id names the Hub dataset it is a "
              "copy of, --dataset_source says where it came from.", flush=True)
    finetuned_protocol = finetuned and collect_results([os.path.join(finetune_dir, "finetune_results.json")])[0][
        "protocol"]  # the recipe the fine-tuned model in finetuned/ was trained with
    card = render_card(template_path, pretrained, summary, results, probe, finetuned_protocol,
                       model_id or os.path.abspath(output_dir), dataset_id,
                       dataset_title(summary, dataset_id, dataset_source),
                       space_metadata)

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
    for index, result in enumerate(results):  # the files as written, tokens redacted
        write_json(os.path.join(output_dir, "results", f"{index:02d}_{result['protocol']}_"
                                f"{result.get('encoder', 'x')}.json"), read_json_object(result["source"]))
    write_json(os.path.join(output_dir, "results", "pretraining_summary.json"), summary)
    if space_dir:
        add_space(space_dir, output_dir)
    card_path = os.path.join(output_dir, "README.md")
    with open(card_path, "w") as handle:
        handle.write(card)
    return card_path


def render_card(template_path: str, pretrained, summary: dict, results: list[dict], probe,
                finetuned_protocol: str | None,
                model_id: str, dataset_id: str | None, dataset_title: str, space_metadata: str = "") -> str:
    """`model_card.md` filled from the model, the pretraining summary and the result files. `model_id`: what the
    card's code loads; `finetuned_protocol`: that of the model in `finetuned/`, None without one."""
    config = pretrained.config
    eval_splits = sorted({r["eval_split"] for r in results if r.get("eval_split")})
    # a result's split is the pretraining run's evaluation images when named alike (a probe or fine-tune on its data)
    evaluated_on = [evaluation_data(summary) if split == summary["eval_split"] else f"`{split}`"
                    for split in eval_splits]
    with open(template_path) as handle:
        template = handle.read()
    model_name = model_id.split("/")[-1] if not os.path.isabs(model_id) else model_id
    values = {
        "model_id": model_id,
        "model_name": model_name,
        "dataset_id": dataset_id or "",
        "datasets_metadata": f"datasets:\n- {dataset_id}" if dataset_id else "",
        "dataset_title": dataset_title,
        "model_index": model_index(model_name, dataset_id, dataset_title, results) if dataset_id else "",
        "space_metadata": space_metadata,
        "space_note": ("- `app.py`, `visualize.py`, `precision.py`, `requirements.txt`, `examples/`: a Gradio demo of "
                       "this model (`python app.py`); pushed as a Space, this folder serves it.\n")
        if space_metadata else "",
        "head_description": "no classification head (the classifier class adds an untrained one)" if probe is None
        else f"a linear-probe head over {probe.config.num_labels} classes "
             f"({', '.join(probe.config.id2label[i] for i in range(probe.config.num_labels))})",
        "pipeline_tag": "image-classification" if probe is not None else "image-feature-extraction",
        "classifier_line": "classifier = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)"
                           "  # the linear probe\n" if probe is not None else "",
        "classification_pipeline": 'pipeline("image-classification", model=repo, trust_remote_code=True)'
                                   "(image)\n" if probe is not None else "",
        "head_limitation": ("- The classification head at the top level is a linear probe" if probe is not None else
                            "- There is no trained classification head at the top level (no probe was published), so "
                            "the image-classification pipeline would use an untrained one") +
                           ("; the fine-tuned classifier is in `finetuned/`." if finetuned_protocol else "."),
        "finetuned_note": f"- `finetuned/`: the classifier of the \"{TITLES[finetuned_protocol]}\" row below (its "
                          "own encoder); load it with `subfolder=\"finetuned\"`.\n" if finetuned_protocol else "",
        "parameters": f"{sum(p.numel() for p in pretrained.parameters()) / 1e6:.2f} M",
        **{name: getattr(config, name) for name in (
            "image_size", "patch_size", "num_patches", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "decoder_num_hidden_layers", "decoder_hidden_size", "decoder_num_attention_heads", "mask_ratio")},
        "target": "per-patch normalised pixels (norm_pix_loss)" if config.norm_pix_loss else "raw (normalised) pixels",
        "pretraining": pretraining_text(summary, dataset_id),
        "eval_split": " / ".join(evaluated_on) or "the evaluation split",
        "evaluation_data": evaluation_data(summary),
        "results_table": results_table(results) if results else "No evaluation results were given.",
        "evaluation": evaluation_text(results),
    }
    # every `{{ name }}` is replaced: a placeholder without a value is an error, never left in the card
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise ValueError(f"model card template: no value for {missing}.")
    return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), template)


HUB_TIMEOUT_SECONDS = 10  # how long the preflight waits for the Hub before calling the network unreachable


def hub_preflight(repo_id: str | None, token: str | None = None) -> str:
    """Check, before any work, that a push to `repo_id` can happen: a valid id, the Hub online, a token, and `whoami`
    answered with it. Raises ValueError (UsageError for a bad --hub_model_id) saying what to fix; returns the user."""
    import threading

    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise UsageError("pushing to the Hub needs --hub_model_id (e.g. your-name/mae-cifar10).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"--hub_model_id {repo_id!r} is not a valid Hub repository id ({error}); expected "
                         "'name' or 'namespace/name' of letters, digits, '-', '_' and '.'.") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError("cannot push to the Hub: HF_HUB_OFFLINE is set. Unset it on a machine with network, or "
                         "publish without --push_to_hub and upload the folder later with `hf upload`.")
    token = token or get_token()
    if not token:
        raise ValueError("cannot push to the Hub: not logged in. Run `hf auth login`, set HF_TOKEN, or pass "
                         "--hub_token.")
    answer = {}

    def ask():
        try:
            answer["user"] = HfApi().whoami(token=token)
        except Exception as error:  # reported below, whatever the transport raised
            answer["error"] = error

    thread = threading.Thread(target=ask, daemon=True)  # daemon: a hanging connection never blocks the exit
    thread.start()
    thread.join(HUB_TIMEOUT_SECONDS)
    if "user" in answer:
        return answer["user"].get("name", "")
    reason = (f"{type(answer['error']).__name__}: {' '.join(str(answer['error']).split())}" if "error" in answer
              else f"no answer within {HUB_TIMEOUT_SECONDS} s")
    raise ValueError(f"cannot push to the Hub: checking the token with the Hub failed ({reason}). Check the network "
                     "and the token (`hf auth whoami`), or publish without --push_to_hub.")


def space_check(space_dir: str) -> str:
    """The Space's README metadata (with the installed gradio's version), after checking the demo folder."""
    from importlib.metadata import PackageNotFoundError, version

    for name in SPACE_FILES:
        if not os.path.exists(os.path.join(space_dir, name)):
            raise ValueError(f"--space: {space_dir}/{name} is missing; expected the repository's demo/ folder.")
    try:
        gradio_version = version("gradio")
    except PackageNotFoundError:
        raise ValueError("--space true records the Gradio version of the Space: install it first "
                         "(pip install -e \".[demo]\").") from None
    return "\n".join(["title: MAE reconstruction demo", "sdk: gradio", f"sdk_version: {gradio_version}",
                      "app_file: app.py"])


def add_space(space_dir: str, output_dir: str) -> None:
    """Copy the demo app, its requirements and examples, and the package files it loads next to the model."""
    for name in SPACE_FILES:
        source = os.path.join(space_dir, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, os.path.join(output_dir, name))
    for path in PACKAGE_FILES_FOR_SPACE:
        shutil.copy(path, os.path.join(output_dir, os.path.basename(path)))


def files_holding(folder: str, secrets, exclude=()) -> list[str]:
    """Files under `folder` (relative paths; `exclude`: names left out) whose bytes, binary or text, hold a secret."""
    needles = [secret.encode() for secret in secrets if secret]
    found = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name not in (".git", ".cache")]  # never uploaded
        for name in names:
            path = os.path.join(root, name)
            if name in exclude or not os.path.isfile(path) or not os.path.getsize(path):
                continue
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if any(data.find(needle) != -1 for needle in needles):
                    found.append(os.path.relpath(path, folder))
    return sorted(found)


def push(folder: str, repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None, revision: str | None = None, create_pr: bool = False,
         exclude: tuple[str, ...] = ()) -> str:
    """Upload the folder (but `exclude`) to the Hub model repository `repo_id` (created if missing), on `revision` (a
    branch, created if missing) or as a pull request; returns the commit's or pull request's url. A folder holding a
    Hub token is refused before anything is sent; a failure says how to upload the folder later."""
    from huggingface_hub import HfApi, get_token

    leaking = files_holding(folder, {token, os.environ.get("HF_TOKEN"), get_token()}, exclude)  # any it could hold
    if leaking:
        raise MAEHFError(f"Refusing to upload {folder}: {', '.join(leaking[:5])} hold(s) a Hub token. Remove the "
                         "token from those files (or the files), then upload the folder with `hf upload`.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                   create_pr=create_pr, ignore_patterns=list(exclude) or None, commit_message=(
                                       commit_message or f"Upload {os.path.basename(os.path.abspath(folder))}"))
    except Exception as error:
        # The command that finishes the same push: same branch, privacy, pull request and excluded files.
        retry = " ".join(["hf upload", repo_id, folder] + ([f"--revision {revision}"] if revision else [])
                         + (["--private"] if private else []) + (["--create-pr"] if create_pr else [])
                         + [f"--exclude {pattern}" for pattern in exclude])
        raise HubPushError(
            f"Pushing to the Hub failed ({type(error).__name__}: {' '.join(str(error).split())}). The folder "
            f"{folder} is complete: upload it later with `{retry}` (log in first with `hf auth login`)."
        ) from error
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url


def check_hub_access(args, model_args: ModelArguments) -> None:
    """--push_to_hub: can --hub_model_id be written with this token? Asked before any work."""
    if args.push_output_to_hub:
        hub_preflight(args.hub_model_id, token=args.hub_token or model_args.token)


def push_output(args, model_args: ModelArguments) -> None:
    """--push_to_hub: upload the script's own --output_dir to --hub_model_id, once, from the main process."""
    if not args.push_output_to_hub or args.process_index != 0:
        return
    url = push(args.output_dir, args.hub_model_id, private=bool(args.hub_private_repo),
               token=args.hub_token or model_args.token, revision=getattr(args, "hub_revision", None),
               exclude=(LOCK_NAME,))  # this run's own lock, held while it uploads
    print(f"[push] {args.output_dir} -> {url}", flush=True)
