"""Loading the models: the model flags (`ModelArguments`), the config they make (`build_config`), pretrained weights
(`load_pretrained`) and classifiers (`load_classifier`); shared by training, evaluation and the scripts."""

import logging as std_logging
import os
import re
import sys
from dataclasses import dataclass

import torch

from .cli import UsageError, flag, parse_overrides, print_once
from .configuration_mae import MAEConfig
from .inputs import check_weights_fit, model_folder_config, read_json_object
from .modeling_mae import MAEForImageClassification
from .paths import folder_listing, looks_local


@dataclass
class ModelArguments:
    model_name_or_path: str | None = flag(None, "Saved model folder (or Hub id) to start from: its config and weights.")
    model_type: str | None = flag(
        None, f"Accepted for transformers' example commands: only {MAEConfig.model_type!r}, the model these scripts "
              "train (ViTMAE checkpoints: convert them with scripts/convert.py).")
    config_name: str | None = flag(None, "Saved config (folder or config.json) to start from, with fresh weights.")
    config_overrides: str | None = flag(
        None, "Comma-separated config changes, e.g. 'hidden_size=128,num_hidden_layers=4,mask_ratio=0.6'.")
    mask_ratio: float | None = flag(
        None, "Fraction of patches masked in pretraining; sets the config's mask_ratio (default: the config's, 0.75 "
              "for a new model).")
    norm_pix_loss: bool | None = flag(
        None, "Per-patch normalised pixel targets; sets the config's norm_pix_loss (default: the config's; a new "
              "model pretrains with it on).")
    image_processor_name: str | None = flag(
        None, "Image processor (folder or Hub id) whose image_mean/image_std normalise the images; its size must be "
              "the model's image_size. Default: the model config's.")
    ignore_mismatched_sizes: bool = flag(
        False, "Start a new classification head when the checkpoint's head has another label count.")
    model_revision: str = flag("main", "Branch, tag or commit of a Hub model (--model_name_or_path, --config_name)")
    token: str | None = flag(None, "Hugging Face token for private Hub models and datasets (default: the login).")
    trust_remote_code: bool = flag(
        False, "Accepted for transformers' example commands; nothing here runs code from the Hub: this package's own "
               "classes load the models, and `datasets` has no loading scripts.")

    def __post_init__(self):  # "~" from a config file, where no shell expands it
        self.model_name_or_path = self.model_name_or_path and os.path.expanduser(self.model_name_or_path)
        self.config_name = self.config_name and os.path.expanduser(self.config_name)
        if self.model_type is not None and self.model_type not in (MAEConfig.model_type, "mae"):
            raise ValueError(
                f"--model_type {self.model_type}: these scripts train {MAEConfig.model_type!r} models only (the MAE "
                "architecture, as transformers' ViTMAE). Drop --model_type (or pass mae_hf); to start from a ViTMAE "
                "checkpoint, convert it first: python scripts/convert.py SRC OUT, then --model_name_or_path OUT.")

    def hub_kwargs(self) -> dict:
        """What `from_pretrained` needs to read a Hub model as asked (revision, token)."""
        return {"revision": self.model_revision, "token": self.token}


def build_config(args: ModelArguments, **fresh_defaults) -> MAEConfig:
    """The model config: from `--model_name_or_path`, `--config_name` or fresh (with `fresh_defaults`), then the
    overriding flags; validated, with an error naming the bad field."""
    source = args.model_name_or_path or args.config_name
    option = "--model_name_or_path" if args.model_name_or_path else "--config_name"
    if source is None:
        config = MAEConfig(**fresh_defaults)
    elif os.path.exists(source):  # config.json (and the weights to load) checked here: a bad file is named
        saved = (model_folder_config(source, option) if os.path.isdir(source)
                 else read_json_object(source, "a model config (config.json)"))
        model_type = saved.get("model_type")
        if model_type != MAEConfig.model_type:
            hint = " Convert it first: python scripts/convert.py SRC OUT." if model_type == "vit_mae" else ""
            raise ValueError(f"{source} holds a {model_type!r} model, not {MAEConfig.model_type!r}.{hint}")
        config = MAEConfig.from_pretrained(source, **args.hub_kwargs())
    elif looks_local(source):
        raise ValueError(f"{option} {source}: no such file or folder. {folder_listing(source)}")
    else:
        try:
            config = MAEConfig.from_pretrained(source, **args.hub_kwargs())
        except OSError as error:
            from huggingface_hub import constants

            reason = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache" if constants.HF_HUB_OFFLINE
                      else " ".join(str(error).split()).split(". ")[0])
            raise ValueError(f"{option} {source}: no such local folder, and loading it from the Hugging Face Hub "
                             f"failed ({reason}). Offline, only models already in the Hub cache load; pass a local "
                             "model folder instead.") from error
    try:
        overrides = parse_overrides(args.config_overrides)
    except ValueError as error:
        raise UsageError(f"--config_overrides: {error}") from None
    fields = sorted(MAEConfig.__annotations__)  # the model's own hyperparameters, not transformers' bookkeeping
    unknown = sorted(key for key in overrides if key not in fields)
    if unknown:
        raise UsageError(f"--config_overrides: unknown field(s) {unknown}; MAEConfig's fields are {fields}.")
    for key, value in (("mask_ratio", args.mask_ratio), ("norm_pix_loss", args.norm_pix_loss)):  # as run_mae.py's
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise UsageError(f"--{key} {value} and --config_overrides {key}={overrides[key]} disagree; give one.")
        overrides[key] = value
    config.update(overrides)
    if args.image_processor_name:
        config.update(processor_normalisation(args, config.image_size))
    try:
        config.check()  # the config loaded was valid: only the flags above can make it invalid
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.model_name_or_path and os.path.isdir(args.model_name_or_path):
        check_weights_fit(args.model_name_or_path, config)  # intact weight files, of the shapes this config needs
    return config


def processor_normalisation(args: ModelArguments, image_size: int) -> dict:
    """image_mean/image_std of --image_processor_name, whose size must be the model's (the scripts resize to it)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    name = args.image_processor_name
    if not os.path.exists(name) and looks_local(name):
        raise ValueError(f"--image_processor_name {name}: no such file or folder. {folder_listing(name)}")
    values, _ = ImageProcessingMixin.get_image_processor_dict(name, **args.hub_kwargs())
    size = values.get("size") or {}
    sides = {size.get("height"), size.get("width"), size.get("shortest_edge")} - {None} if isinstance(size, dict) \
        else {size}
    if sides and sides != {image_size}:
        raise ValueError(f"--image_processor_name {name} resizes to {size}, but the model takes {image_size}x"
                         f"{image_size} images; use a processor of that size or --config_overrides image_size=...")
    missing = [key for key in ("image_mean", "image_std") if key not in values]
    if missing:
        raise ValueError(f"--image_processor_name {name} has no {' or '.join(missing)}.")
    return {"image_mean": list(values["image_mean"]), "image_std": list(values["image_std"])}


HEAD_PREFIXES = ("classifier.", "head_norm.")  # the classification head: new when starting from an encoder


def load_pretrained(model_class, model_args: ModelArguments, config, new_head: str | None = None, **kwargs):
    """`model_class.from_pretrained(--model_name_or_path)` with the Hub flags and --ignore_mismatched_sizes. When
    exactly the classification head is new, `new_head` says so in one line in place of transformers' load report
    (None: nothing said); any other missing, unexpected or mismatched key keeps the full report."""
    reports = []  # transformers' LOAD REPORT, held back so that its expected parts can be said in plain words

    def hold(record) -> bool:
        if "LOAD REPORT" in record.getMessage():
            reports.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))  # no raw colour codes in logs
            return False
        return True

    loader_logger = std_logging.getLogger("transformers.modeling_utils")
    loader_logger.addFilter(hold)
    try:
        model, info = model_class.from_pretrained(
            model_args.model_name_or_path, config=config, output_loading_info=True,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **model_args.hub_kwargs(), **kwargs)
    except BaseException:
        for report in reports:  # the report explains the failure
            print(report, file=sys.stderr, flush=True)
        raise
    finally:
        loader_logger.removeFilter(hold)
    mismatched = {key[0] if isinstance(key, (tuple, list)) else key for key in info.get("mismatched_keys", ())}
    new = set(info.get("missing_keys", ())) | mismatched
    expected = {key for key in new if key.startswith(HEAD_PREFIXES)}
    if new - expected or info.get("unexpected_keys") or info.get("error_msgs"):
        for report in reports:
            print(report, file=sys.stderr, flush=True)
    elif expected and new_head:
        replaced = " (the checkpoint's head, of another label count, is replaced)" if mismatched else ""
        print_once(f"[model] {model_args.model_name_or_path}: encoder loaded; {new_head}{replaced}.")
    return model


def load_classifier(model_args, random_init: bool, seed: int, num_labels: int, class_names: list[str] | None,
                    new_head: str | None = None, **config_changes):
    """`MAEForImageClassification` with a pretrained encoder or a random one of the same config, for `num_labels`
    classes (named `class_names`, else by number), `config_changes` (pooling, ...) applied; `new_head`: see
    `load_pretrained`."""
    config = build_config(model_args)
    names = class_names or [str(i) for i in range(num_labels)]
    config_changes.update(num_labels=num_labels, id2label=dict(enumerate(names)),
                          label2id={name: i for i, name in enumerate(names)})
    if (model_args.model_name_or_path and not random_init and is_classifier(config)
            and config.num_labels != num_labels and not model_args.ignore_mismatched_sizes):
        raise ValueError(f"{model_args.model_name_or_path} is a classifier with {config.num_labels} labels; this data "
                         f"has {num_labels}. Pass --ignore_mismatched_sizes true to replace its head with a new one "
                         "(the encoder is kept).")
    config.update(config_changes)
    if config.problem_type is None:  # as transformers' loss would settle it at the first step (a second compile)
        config.problem_type = "single_label_classification"
    config.check()
    torch.manual_seed(seed)  # a new head (or encoder) is drawn from the seed, whatever ran before in this process
    if model_args.model_name_or_path and not random_init:
        return load_pretrained(MAEForImageClassification, model_args, config, new_head=new_head)
    return MAEForImageClassification(config)


def is_classifier(config) -> bool:
    """Whether a checkpoint's config was saved by a classifier (so that its folder holds a trained head)."""
    return "MAEForImageClassification" in (config.architectures or [])
