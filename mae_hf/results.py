"""Result files of the evaluation protocols (`<protocol>_results.json`) and the tables built from them.

Every number in a table or model card comes from these files, which the scripts write after measuring."""

import glob
import hashlib
import os
import platform

import torch
import transformers

from .augment import STRONG_RECIPE_OFF
from .data.prepared import prepared_source
from .inputs import read_json_object, write_json
from .paths import looks_local
from .probes import FROZEN_PROTOCOLS

PROTOCOLS = (*(protocol.name for protocol in FROZEN_PROTOCOLS), "finetune", "finetune_strong")  # table order
TITLES = {**{protocol.name: protocol.title for protocol in FROZEN_PROTOCOLS if protocol.title},
          "finetune": "Fine-tune (whole encoder trained)",
          "finetune_strong": "Fine-tune, strong recipe (+ RandAugment, mixup/cutmix, random erasing, repeated "
                             "augmentation, weight EMA)"}
KNN_DESCRIPTION = " (frozen encoder, cosine, weighted votes)"  # on the first kNN row only
ENCODERS = (("random_init", "Random-init encoder"), ("pretrained", "MAE-pretrained encoder"))
# what a result file records besides its settings: everything else in it is a setting of the protocol
NOT_SETTINGS = {"protocol", "encoder", "eval_accuracy", "eval_loss", "model_name_or_path", "encoder_fingerprint",
                "dataset_name", "train_split", "eval_split", "train_samples", "eval_samples", "source",
                "skipped_images", "eval_ema_accuracy", "eval_ema_loss", "ema_model", "versions", "architecture"}


def finetune_protocol(settings: dict) -> str:
    """"finetune_strong" when any part of the strong recipe is on in `settings` (`FinetuneArguments.recipe()` or a
    result file), else "finetune": the two recipes are two rows of a table, not one cell in conflict."""
    strong = any(settings.get(key, off) not in (off, None) for key, off in STRONG_RECIPE_OFF.items())
    return "finetune_strong" if strong else "finetune"


def software_versions() -> dict:
    """The versions a number was measured with, recorded beside it (numbers move between releases)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def architecture(config) -> dict:
    """The encoder's shape as a result file records it: a random-init baseline must match the pretrained model."""
    return {field: getattr(config, field) for field in ("image_size", "patch_size", "num_channels", "hidden_size",
                                                        "num_hidden_layers", "num_attention_heads", "mlp_ratio",
                                                        "qkv_bias", "hidden_act")}


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short hash of an encoder's weights: tells which encoder a result measured, wherever its folder moved."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_record(data_args, train, evaluation, *, device, world_size: int, bf16: bool, seed: int,
               crop_fraction: float, precision: str | None = None) -> dict:
    """What every result file records of its run: the data (splits, sizes, skipped images, storage, crop), the device
    as `"<processes> x <type>"`, the precision and the seed; `write_results` adds the software versions."""
    record = {"dataset_name": data_args.dataset_name, "train_split": train.split, "eval_split": evaluation.split,
              "train_samples": len(train), "eval_samples": len(evaluation)}
    if data_args.skip_bad_images or train.skipped or evaluation.skipped:
        record["skipped_images"] = {split.split: list(split.skipped) for split in (train, evaluation)}
    record.update(eval_crop_fraction=crop_fraction, stored_short_side=train.short_side,
                  device=f"{world_size} x {torch.device(device).type}", bf16=bf16,
                  **({} if precision is None else {"precision": precision}), seed=seed)
    return record


def write_results(output_dir: str, name: str, results: dict) -> None:
    """`<output_dir>/<name>_results.json` (with the software versions, without Hub tokens), and a one-line summary."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name}_results.json")
    write_json(path, {**results, "versions": software_versions()}, sort_keys=True)
    print(f"[{name}] {results.get('encoder', '')} encoder: eval_accuracy {results['eval_accuracy']:.4f} "
          f"({results.get('eval_samples', '?')} images) -> {path}", flush=True)


def is_local_dataset(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name)) or looks_local(name)


# Folder names that say which split, not which dataset: a local dataset in such a folder is named with its parent.
SPLIT_FOLDERS = ("train", "training", "val", "valid", "validation", "test", "eval")


def _dataset_names(name: str, prepared_from: dict | None = None) -> list[tuple[str, str]]:
    """("hub", id) or ("local", `folder_name`) of a dataset and, for a prepared folder, of its source."""
    if prepared_from is None and is_local_dataset(name):
        prepared_from = prepared_source(os.path.expanduser(name))
    source = prepared_from or {}
    values = [str(value) for value in (name, source.get("dataset_name"), source.get("train_dir")) if value]
    return [("local", folder_name(value).lower()) if is_local_dataset(value) else ("hub", value.lower())
            for value in values]


def folder_name(path: str) -> str:
    """A local dataset's own name: its folder's, or parent/name for a split folder (`imagenet/train`)."""
    parts = os.path.normpath(os.path.abspath(os.path.expanduser(path))).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1].lower() in SPLIT_FOLDERS else parts[-1]


def _match(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Two Hub ids when equal; two folders when their keys are; a folder and a Hub id when the folder is named like
    the dataset (`../data/cifar10`, `../data/cifar10/train` as copies of `uoft-cs/cifar10`)."""
    local, hub = (a, b) if a[0] == "local" else (b, a)
    return a[1] == b[1] if a[0] == b[0] else local[1].split("/")[0] == hub[1].split("/")[-1]


def same_dataset(name: str, other: str, prepared_from: dict | None = None) -> bool:
    """Whether two records name one dataset (see `_match`); a prepared folder also by the source it came from."""
    return any(_match(a, b) for a in _dataset_names(name, prepared_from) for b in _dataset_names(other))


def collect_results(paths) -> list[dict]:
    """The checked results in result files, or in folders searched recursively for `*_results.json` (not Trainer's)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*_results.json"), recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder.")
    results = []
    for file in dict.fromkeys(os.path.realpath(file) for file in files):  # each file once, in order
        if os.path.basename(file) in TRAINER_FILES:
            continue
        result = read_json_object(file, "a result file written by the scripts")
        if result:  # an empty {} is no result; anything else must be one
            check_result(result, file)
            if result["protocol"] == "finetune":  # files written before "finetune_strong": the recipe they record
                result["protocol"] = finetune_protocol(result)
            results.append(dict(result, source=file))
    return results


# The Trainer's own metric files (beside a fine-tune's finetune_results.json): not protocol results.
TRAINER_FILES = ("all_results.json", "train_results.json", "eval_results.json", "test_results.json",
                 "predict_results.json")


def check_result(result: dict, file: str) -> None:
    """A result file's numbers and names as the scripts write them (anything else would reach a table as measured)."""
    def refuse(key: str, expected: str) -> None:
        raise ValueError(f"{file}: {key} is {result.get(key)!r}; expected {expected}. A result file holds what a "
                         "script measured: run that script again rather than editing the file.")

    if result.get("protocol") not in PROTOCOLS:
        refuse("protocol", f"one of {', '.join(PROTOCOLS)}")
    if "encoder" in result and result["encoder"] not in dict(ENCODERS):
        refuse("encoder", f"one of {', '.join(dict(ENCODERS))}")
    accuracies = ["eval_accuracy", *(key for key in result if key.startswith("eval_accuracy_")
                                     or key == "eval_ema_accuracy")]
    for key in accuracies:
        value = result.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            refuse(key, "a fraction in [0, 1] (NaN and percentages are not)")
    for key in ("dataset_name", "eval_split", "train_split"):
        if key in result and not isinstance(result[key], str):
            refuse(key, "a string")
    for key in ("eval_samples", "train_samples"):
        if key in result and (isinstance(result[key], bool) or not isinstance(result[key], int)):
            refuse(key, "a whole number of images")


def _cells(result: dict) -> list:
    """((protocol position, k), accuracy key) of each table cell a result fills: one per protocol, one per k of kNN."""
    position = PROTOCOLS.index(result["protocol"])  # a known one: `check_result` refused others
    if result["protocol"] != "knn":
        return [((position, 0), "eval_accuracy")]
    return [((position, int(key.removeprefix("eval_accuracy_k"))), key) for key in sorted(result)
            if key.startswith("eval_accuracy_k")]


def accuracy_rows(results: list[dict]) -> dict:
    """{row title: {encoder: (accuracy, result)}} in table order. Two results for one cell must agree (the same run
    found twice); otherwise the table would depend on file order, so that is an error naming both files."""
    grid = {}
    for result in results:
        for position, key in _cells(result):
            cell = position, result.get("encoder", "pretrained")
            if cell in grid and grid[cell][0] != result[key]:
                raise ValueError(f"Two {result['protocol']} results of the {cell[1]} encoder disagree ({key}): "
                                 f"{grid[cell][1].get('source')} has {grid[cell][0]:.4f}, {result.get('source')} "
                                 f"has {result[key]:.4f}. Pass only the one to report.")
            grid[cell] = result[key], result
    first_k = min((k for (index, k), _ in grid if PROTOCOLS[index] == "knn"), default=None)
    rows = {}
    for ((index, k), encoder), cell in sorted(grid.items()):
        title = TITLES.get(PROTOCOLS[index]) or f"kNN, k = {k}" + (KNN_DESCRIPTION if k == first_k else "")
        rows.setdefault(title, {})[encoder] = cell
    for cells in rows.values():
        check_comparable([result for _, result in cells.values()])
    check_one_table(results)
    return rows


def check_one_table(results: list[dict]) -> None:
    """A table has one pretrained column and no dataset column: its pretrained results must measure one encoder
    (a fine-tune records the encoder it started from, so it counts as the same), and all results one dataset."""
    pretrained = [result for result in results if result.get("encoder", "pretrained") == "pretrained"
                  and result.get("encoder_fingerprint")]
    for result in pretrained[1:]:
        if result["encoder_fingerprint"] != pretrained[0]["encoder_fingerprint"]:
            raise ValueError(
                f"{pretrained[0].get('source')} and {result.get('source')} measured two different encoders "
                f"({pretrained[0].get('model_name_or_path')}, {result.get('model_name_or_path')}): a table's "
                "pretrained column is one model. Compare them in two tables.")
    named = [result for result in results if result.get("dataset_name")]
    for result in named[1:]:
        if not same_dataset(named[0]["dataset_name"], result["dataset_name"]):
            raise ValueError(
                f"{named[0].get('source')} was measured on {named[0]['dataset_name']} and {result.get('source')} on "
                f"{result['dataset_name']}: a table holds the results of one dataset. Compare them in two tables.")


def evaluation_data(result: dict) -> str:
    return (f"{result.get('dataset_name')}, {result.get('eval_split')} ({result.get('eval_samples')} images)")


# What a row's cells must share besides the images; files written before a key was recorded are not checked on it.
SAME_IN_A_ROW = ("architecture", "pooling", "feature_blocks")


def check_comparable(results: list[dict]) -> None:
    """The cells of one row (random init against pretrained) must be measured on the same images (dataset or a copy,
    split, number of images) with the same `SAME_IN_A_ROW`; otherwise the gain would not compare two encoders."""
    first = results[0]
    for other in results[1:]:
        for key in SAME_IN_A_ROW:
            if key in first and key in other and first[key] != other[key]:
                raise ValueError(
                    f"{first['protocol']}: {first.get('source')} has {key} {first[key]} and {other.get('source')} "
                    f"has {key} {other[key]}; one row compares encoders of the same architecture with the same "
                    "features. Run the baseline with the pretrained model's settings (--random_init true with "
                    "--model_name_or_path of that model takes its architecture).")
        same_split = (first.get("eval_split"), first.get("eval_samples")) == \
            (other.get("eval_split"), other.get("eval_samples"))
        same_data = not (first.get("dataset_name") and other.get("dataset_name")) or \
            same_dataset(first["dataset_name"], other["dataset_name"])
        if not (same_split and same_data):
            raise ValueError(
                f"{first['protocol']}: {first.get('source')} was evaluated on {evaluation_data(first)} and "
                f"{other.get('source')} on {evaluation_data(other)}; one row compares encoders on the same images. "
                f"Run both with the same data flags (--dataset_name, --eval_split, --max_eval_samples).")


def unique_results(results: list[dict]) -> list[dict]:
    """The results with agreeing duplicates (one run's numbers in two files) once; disagreeing ones are an error."""
    accuracy_rows(results)
    seen, unique = set(), []
    for result in results:
        numbers = tuple(sorted((key, value) for key, value in result.items() if key.startswith("eval_accuracy")))
        key = result["protocol"], result.get("encoder", "pretrained"), numbers
        if key not in seen:
            seen.add(key)
            unique.append(result)
    return unique


def results_table(results: list[dict]) -> str:
    """Markdown table: protocols as rows, random-init and pretrained encoders side by side (top-1 %)."""
    rows = accuracy_rows(results)
    if not rows:
        raise ValueError("No protocol results found (expected *_results.json files written by the scripts).")
    lines = ["| Protocol | " + " | ".join(name for _, name in ENCODERS) + " | Gain |",
             "|---|" + "---:|" * (len(ENCODERS) + 1)]
    for title, cells in rows.items():
        values = [cells[encoder][0] if encoder in cells else None for encoder, _ in ENCODERS]
        shown = [f"{100 * value:.2f}" if value is not None else "–" for value in values]
        gain = f"{100 * (values[1] - values[0]):+.2f}" if None not in values else "–"
        lines.append(f"| {title} | " + " | ".join(shown) + f" | {gain} |")
    return "\n".join(lines)
