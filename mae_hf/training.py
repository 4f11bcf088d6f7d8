"""Training with the Hugging Face `Trainer`: image batches arrive as uint8 and are augmented on the device,
parameter groups follow the MAE recipe, a non-finite loss, gradient norm or weight stops the run before anything is
saved from it (see runs.py), and pretraining evaluations also draw reconstructions and measure kNN accuracy."""

import logging as std_logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .cli import UsageError, parse_overrides
from .configuration_mae import MAEConfig
from .data import BatchTransform, load_image_splits  # load_image_splits: patched by tests
from .data.policy import print_once
from .inputs import check_weights_fit, model_folder_config, read_json_object
from .paths import folder_listing, looks_local
from .precision import decide_bf16
from .redaction import is_token_name
from .runs import (
    LOCK_NAME,
    SETTINGS_NAME,
    DivergenceGuard,
    StopOnSignal,
    _DropMessage,
    removed_if_incomplete,
    saved_whole,
    write_json,
)

logger = logging.get_logger("mae_hf")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved model folder (or Hub id) to start from: its config and weights."})
    model_type: str | None = field(
        default=None,
        metadata={"help": f"Accepted for transformers' example commands: only {MAEConfig.model_type!r}, the model "
                          "these scripts train (ViTMAE checkpoints: convert them with scripts/convert.py)."})
    config_name: str | None = field(
        default=None, metadata={"help": "Saved config (folder or config.json) to start from, with fresh weights."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config changes, e.g. 'hidden_size=128,num_hidden_layers=4,mask_ratio=0.6'."})
    mask_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of patches masked in pretraining; sets the config's mask_ratio (default: the "
                          "config's, 0.75 for a new model)."})
    norm_pix_loss: bool | None = field(
        default=None,
        metadata={"help": "Per-patch normalised pixel targets; sets the config's norm_pix_loss (default: the "
                          "config's; a new model pretrains with it on)."})
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Image processor (folder or Hub id) whose image_mean/image_std normalise the images; its "
                          "size must be the model's image_size. Default: the model config's."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start a new classification head when the checkpoint's head has another label count."})
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of a Hub model (--model_name_or_path, --config_name)"})
    token: str | None = field(
        default=None, metadata={"help": "Hugging Face token for private Hub models and datasets (default: the login)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Accepted for transformers' example commands; nothing here runs code from the Hub: this "
                          "package's own classes load the models, and `datasets` has no loading scripts."})

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

    def model_flags(self) -> dict:
        """The config values given as their own flags (--mask_ratio, --norm_pix_loss), as transformers' run_mae.py."""
        return {key: value for key, value in (("mask_ratio", self.mask_ratio), ("norm_pix_loss", self.norm_pix_loss))
                if value is not None}


def build_config(args: ModelArguments, **fresh_defaults) -> MAEConfig:
    """The model config: from `--model_name_or_path`, `--config_name` or fresh (with `fresh_defaults`), then the
    overrides (--config_overrides, --mask_ratio, --norm_pix_loss, --image_processor_name's normalisation);
    validated, with an error naming the bad field."""
    source = args.model_name_or_path or args.config_name
    if source is not None and not os.path.exists(source) and looks_local(source):
        option = "--model_name_or_path" if args.model_name_or_path else "--config_name"
        raise ValueError(f"{option} {source}: no such file or folder. {folder_listing(source)}")
    if source is not None:
        option = "--model_name_or_path" if args.model_name_or_path else "--config_name"
        local = os.path.exists(source)
        if local:  # config.json (and the weights to load) checked here, so a bad file is named, not a traceback
            saved = (model_folder_config(source, option) if os.path.isdir(source)
                     else read_json_object(source, "a model config (config.json)"))
            model_type = saved.get("model_type")
            if model_type != MAEConfig.model_type:
                hint = " Convert it first: python scripts/convert.py SRC OUT." if model_type == "vit_mae" else ""
                raise ValueError(f"{source} holds a {model_type!r} model, not {MAEConfig.model_type!r}.{hint}")
        try:
            config = MAEConfig.from_pretrained(source, **args.hub_kwargs())
        except OSError as error:
            if local:
                raise
            from huggingface_hub import constants

            reason = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache" if constants.HF_HUB_OFFLINE
                      else " ".join(str(error).split()).split(". ")[0])
            raise ValueError(f"{option} {source}: no such local folder, and loading it from the Hugging Face Hub "
                             f"failed ({reason}). Offline, only models already in the Hub cache load; pass a local "
                             "model folder instead.") from error
    else:
        config = MAEConfig(**fresh_defaults)
    try:
        overrides = parse_overrides(args.config_overrides)
    except ValueError as error:
        raise UsageError(f"--config_overrides: {error}") from None
    fields = sorted(MAEConfig.__annotations__)  # the model's own hyperparameters, not transformers' bookkeeping
    unknown = sorted(key for key in overrides if key not in fields)
    if unknown:
        raise UsageError(f"--config_overrides: unknown field(s) {unknown}; MAEConfig's fields are {fields}.")
    for key, value in args.model_flags().items():
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


def check_hub_access(args, model_args: ModelArguments) -> None:
    """--push_to_hub: can --hub_model_id be written with this token? Asked before any work (a clear error, no
    training that ends in a failed upload)."""
    if args.push_output_to_hub:
        from .publish import hub_preflight

        hub_preflight(args.hub_model_id, token=args.hub_token or model_args.token)


def push_output(args, model_args: ModelArguments) -> None:
    """--push_to_hub: upload the script's own --output_dir (model, code files, processor, results, pictures) to
    --hub_model_id, once, from the main process."""
    if not args.push_output_to_hub or args.process_index != 0:
        return
    from .publish import push

    url = push(args.output_dir, args.hub_model_id, private=bool(args.hub_private_repo),
               token=args.hub_token or model_args.token, revision=getattr(args, "hub_revision", None),
               commit_message=f"Upload {os.path.basename(os.path.abspath(args.output_dir))}",
               exclude=(LOCK_NAME,))  # this run's own lock, held while it uploads
    print(f"[push] {args.output_dir} -> {url}", flush=True)


class _LoadReportHold(std_logging.Filter):
    """Holds back transformers' LOAD REPORT so that the expected parts of it can be said in plain words."""

    def __init__(self):
        super().__init__()
        self.reports = []

    def filter(self, record):
        if "LOAD REPORT" in record.getMessage():
            self.reports.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))  # no raw colour codes in logs
            return False
        return True

    def release(self):
        for report in self.reports:
            print(report, file=sys.stderr, flush=True)
        self.reports = []


HEAD_PREFIXES = ("classifier.", "head_norm.")  # the classification head: new when starting from an encoder


def load_pretrained(model_class, model_args: ModelArguments, config, new_head: str | None = None, **kwargs):
    """`model_class.from_pretrained(--model_name_or_path)` with the Hub flags and --ignore_mismatched_sizes.

    transformers reports every key the checkpoint lacks. When exactly the head is missing (a classifier started from
    a pretraining or encoder checkpoint, or a head replaced by --ignore_mismatched_sizes), `new_head` says so in
    one line (None: nothing to say) and the table is not shown; any other missing, unexpected or mismatched key
    keeps transformers' full report."""
    loader_logger = std_logging.getLogger("transformers.modeling_utils")
    hold = _LoadReportHold()
    loader_logger.addFilter(hold)
    try:
        model, info = model_class.from_pretrained(
            model_args.model_name_or_path, config=config, output_loading_info=True,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **model_args.hub_kwargs(), **kwargs)
    except BaseException:
        hold.release()  # the report explains the failure
        raise
    finally:
        loader_logger.removeFilter(hold)
    mismatched = {key[0] if isinstance(key, (tuple, list)) else key for key in info.get("mismatched_keys", ())}
    new = set(info.get("missing_keys", ())) | mismatched
    expected = {key for key in new if key.startswith(HEAD_PREFIXES)}
    if new - expected or info.get("unexpected_keys") or info.get("error_msgs"):
        hold.release()
    elif expected and new_head:
        replaced = " (the checkpoint's head, of another label count, is replaced)" if mismatched else ""
        print_once(f"[model] {model_args.model_name_or_path}: encoder loaded; {new_head}{replaced}.")
    return model


@dataclass
class ImageTrainingArguments(TrainingArguments):
    """`TrainingArguments` for image batches served from tensors and augmented on the device, with the MAE
    learning-rate rule (peak lr = base lr x total batch / 256) and the defaults both recipes share."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the model, checkpoints and results go."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate. Default: --base_learning_rate x total batch / 256."})
    base_learning_rate: float = field(
        default=1.5e-4,
        metadata={"help": "Learning rate per 256 images of total batch (used without --learning_rate)."})
    crop_min_scale: float = field(
        default=0.2, metadata={"help": "Random-resized-crop area range [crop_min_scale, 1]; 1 disables cropping."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    data_on_device: str = field(
        default="auto",
        metadata={"help": "Keep the decoded uint8 training set on the GPU: 'auto' (when it fits easily), 'true', "
                          "'false'. Only for images held in memory (--data_in_memory)."})
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes per training process. Images read from disk are decoded by "
                          "them (default: this process's share of the CPUs, one left for it); images held in "
                          "memory need none (default 0)."})
    dataloader_persistent_workers: bool | None = field(
        default=None,
        metadata={"help": "Keep DataLoader workers between epochs and evaluations (default: on when there are "
                          "workers)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast: true, false or auto (the default: on where the hardware computes bf16 "
                          "natively — an NVIDIA GPU of compute capability 8.0 or newer, a CPU with AMX, AVX512-BF16 or "
                          "Arm's BF16 — off elsewhere; fp32 on those GPUs computes matrix products in TF32 unless "
                          "--tf32 false; the plan line says which and why)."})
    torch_compile: bool | None = field(
        default=None, metadata={"help": "torch.compile: true, false or auto (the default: on with CUDA)."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch per device."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay, on linear weights only unless --decay_all_parameters."})
    decay_all_parameters: bool = field(
        default=False,
        metadata={"help": "Apply weight decay to every parameter (biases, norms, tokens too), as plain AdamW does."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warmup."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup: steps, or a fraction of all steps if < 1."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (fraction if < 1)."})
    save_steps: float = field(default=0.1, metadata={"help": "Checkpoint every N steps (fraction if < 1)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=0.01, metadata={"help": "Log every N steps (fraction if < 1)."})
    total_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "The batch of one optimizer step, across processes: sets --gradient_accumulation_steps "
                          "to this / (--per_device_train_batch_size x processes), which must divide it (the MAE "
                          "recipes' 4096 on any number of GPUs)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Always False here: batches are prebuilt tensors with no unused columns."})
    do_train: bool | None = field(
        default=None,
        metadata={"help": "Train. With neither --do_train nor --do_eval: train, then evaluate. --do_eval alone does "
                          "not train (--do_eval --model_name_or_path DIR evaluates a saved model); evaluation is on "
                          "unless --do_eval false (the default --eval_strategy steps turns it on, as in "
                          "TrainingArguments)."})
    do_eval: bool | None = field(
        default=None,
        metadata={"help": "Evaluate (see --do_train). Evaluations also run during training by --eval_strategy; "
                          "--do_eval false turns those off too."})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "transformers 4.x's name for a warmup fraction: the same as --warmup_steps with a value "
                          "< 1."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "See TrainingArguments."})
    ddp_broadcast_buffers: bool | None = field(
        default=False,
        metadata={"help": "DDP: copy the buffers from the first process before every forward. Off: the models' "
                          "buffers (sin-cos positions) never change, so the copy would only cost time."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Kept False: the Trainer's filter tests every step's loss on the host (a GPU sync per "
                          "step); a non-finite loss stops the run instead (checked on the device)."})
    allow_config_change: bool = field(
        default=False,
        metadata={"help": "Resume even though the model, data or recipe settings differ from the checkpoint's "
                          "(both are recorded in the run's summary)."})

    def __post_init__(self):
        if self.output_dir is None:  # transformers would quietly write to ./trainer_output
            raise ValueError("--output_dir is required (where the model, checkpoints and results go).")
        if not torch.accelerator.is_available():
            self.use_cpu = True  # makes torchrun/accelerate launch run DDP over gloo on CPU-only machines
        gpu = torch.cuda.is_available() and not self.use_cpu
        self.decide_precision("cpu" if self.use_cpu else torch.accelerator.current_accelerator().type)
        if self.torch_compile is None:
            self.torch_compile = gpu
        if not gpu:
            self.dataloader_pin_memory = False  # nothing to pin for
        # Worker settings left unset are decided by `configure_loaders` once the data's path is known.
        self.workers_chosen = self.dataloader_num_workers is not None
        self.persistent_workers_chosen = self.dataloader_persistent_workers is not None
        if not self.workers_chosen:
            self.dataloader_num_workers = 0 if self.dataloader_prefetch_factor is None else 1
        if not self.persistent_workers_chosen:
            self.dataloader_persistent_workers = False
        if self.data_on_device not in ("auto", "true", "false"):
            raise ValueError(f"--data_on_device must be auto, true or false, got {self.data_on_device!r}.")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"--crop_min_scale must lie in (0, 1], got {self.crop_min_scale}.")
        self.check_numbers()
        self._upstream_conventions()
        learning_rate_given = self.learning_rate is not None
        if not learning_rate_given:
            self.learning_rate = 0.0  # placeholder until the world size is known
        if self.accelerator_config is None:
            # Batches go to the GPU without making the host wait (from the loader's pinned memory); accelerate's
            # default copies block. A no-op on a CPU, where transformers' warning about unpinned memory means nothing.
            self.accelerator_config = {"non_blocking": True}
        # TrainingArguments warns that compile's speedups need an Ampere GPU whenever it finds no TF32; on a CPU
        # (where --torch_compile true is measured and documented: docs/cpu_speed.md) that reads as a fault.
        compile_warning = _DropMessage("The speedups for torchdynamo mostly come with GPU")
        upstream_logger = std_logging.getLogger("transformers.training_args")
        upstream_logger.addFilter(compile_warning)
        try:
            super().__post_init__()  # also: do_eval becomes True when eval_strategy is not "no" (TrainingArguments')
        finally:
            upstream_logger.removeFilter(compile_warning)
        # accelerate builds no FSDP plugin for CPU processes (only for GPU-like devices): they would train as plain
        # DDP. One process is refused by the Trainer itself ("fsdp only works in distributed training").
        if self.fsdp and self.use_cpu and self.world_size > 1:
            raise UsageError("--fsdp shards the model over GPU processes; on CPU processes accelerate trains without "
                             "it (plain DDP, every process holding the whole model), so it would not save the memory "
                             "it promises. Leave --fsdp out on a CPU, or run on GPUs (docs/pretraining.md).")
        if not (self.do_train or self.do_eval):
            raise ValueError("--do_train and --do_eval are both off: nothing to do. Pass --do_train true and/or "
                             "--do_eval true (or neither: train, then evaluate).")
        if self.total_train_batch_size is not None:
            steps = self.accumulation_for(self.total_train_batch_size)
            if self.gradient_accumulation_steps not in (1, steps):
                raise ValueError(f"--gradient_accumulation_steps {self.gradient_accumulation_steps} and "
                                 f"--total_train_batch_size {self.total_train_batch_size} (= {steps} step(s) here) "
                                 "disagree; give one of them.")
            self.gradient_accumulation_steps = steps
        if not learning_rate_given:
            total_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
            self.learning_rate = self.base_learning_rate * total_batch / 256

    def __getstate__(self):
        """A pickled copy holds no Hub token: the Trainer pickles the arguments into training_args.bin beside every
        saved model and checkpoint, and --push_to_hub uploads those folders."""
        return {name: None if is_token_name(name) and isinstance(value, str) else value
                for name, value in self.__dict__.items()}

    def decide_precision(self, device_type: str) -> None:
        """--bf16 by mae_hf/precision.py's rule (default: native bf16 or not); `precision` says which and why."""
        if self.fp16 and device_type == "cpu":
            raise ValueError("--fp16 is half-precision training for GPUs (with loss scaling); on a CPU use bf16 "
                             "(--bf16 true: fp32's range, no loss scaling; the default on CPUs with AMX or "
                             "AVX512-BF16) or fp32 (--bf16 false).")
        if self.fp16_full_eval and device_type == "cpu":
            raise ValueError("--fp16_full_eval evaluates in half precision, which is for GPUs; on a CPU evaluate in "
                             "bf16 (--bf16_full_eval true) or in the training precision (leave it out).")
        if self.fp16:
            self.bf16, self.precision = False, "fp16 (--fp16)"
        else:
            self.bf16, self.precision = decide_bf16(self.bf16, device_type, tf32=self.tf32)
        if self.bf16_full_eval or self.fp16_full_eval:
            self.precision += f"; evaluation with the model cast to {'bf16' if self.bf16_full_eval else 'fp16'}"

    def _upstream_conventions(self):
        """Flags of transformers' example scripts, with their meaning where it exists here."""
        if self.do_train is None and self.do_eval is None:  # these scripts' default: train, then evaluate
            self.do_train = self.do_eval = True
        elif self.do_eval is False:  # asked not to evaluate: no evaluations during training either
            self.eval_strategy = "no"
        self.do_train, self.do_eval = bool(self.do_train), bool(self.do_eval)
        if self.remove_unused_columns:
            print_once("note: --remove_unused_columns is ignored: batches here are prebuilt tensors (pixel_values, "
                       "labels) with no unused columns to remove.", file=sys.stderr)
            self.remove_unused_columns = False
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio is a fraction of all steps in [0, 1), got {self.warmup_ratio}.")
            self.warmup_steps = self.warmup_ratio
        # --push_to_hub: the script pushes its own output folder at the end (model, code files, processor, results);
        # the Trainer's push would upload a bare folder with its own card, so it stays off.
        self.push_output_to_hub, self.push_to_hub = self.push_to_hub, False
        if self.push_output_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/mae-cifar10).")

    def check_numbers(self) -> None:
        """Sizes, step counts and rates that transformers or torch would only refuse later (or never: --max_steps 0
        trained for the epochs), each named as the flag."""
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be a positive number of steps (or -1: train for --num_train_epochs), "
                             f"got {self.max_steps}.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be positive, got {self.num_train_epochs}.")
        for flag in ("learning_rate", "base_learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, flag)
            if value is not None and (value < 0 or value != value or value == float("inf")):
                raise ValueError(f"--{flag} must be a finite number >= 0, got {value}.")

    def accumulation_for(self, total: int) -> int:
        """The gradient accumulation steps that make a step of `total` images with this batch and world size."""
        per_step = self.per_device_train_batch_size * self.world_size
        if total < 1 or total % per_step:
            raise ValueError(f"--total_train_batch_size {total} is not a multiple of --per_device_train_batch_size "
                             f"{self.per_device_train_batch_size} x {self.world_size} process(es) = {per_step}: pick a "
                             "per-device batch that divides it.")
        return total // per_step

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    def check_enough_images(self, num_images: int) -> None:
        """Training drops incomplete batches (static shapes for torch.compile): at least one full batch is needed."""
        if num_images < self.global_batch_size:
            raise ValueError(
                f"The training split has {num_images} images, fewer than one batch of {self.global_batch_size} "
                f"({self.per_device_train_batch_size} per device x {self.world_size} process(es) x "
                f"{self.gradient_accumulation_steps} accumulation step(s)). Lower --per_device_train_batch_size or "
                "use more images.")

    def batch_transforms(self, config, eval_crop_fraction: float = 1.0):
        """(train, eval) `BatchTransform`s: crop + flip for training as configured (drawn from a generator seeded
        with --seed and the process index), the centre crop and normalisation for eval."""
        crop = (self.crop_min_scale, 1.0) if self.crop_min_scale < 1 else None
        return (BatchTransform.for_model(config, crop_scale=crop, hflip=self.horizontal_flip,
                                         seed=self.seed + self.process_index, training=True),
                BatchTransform.for_model(config, eval_crop_fraction=eval_crop_fraction))

    def requested_workers(self) -> int | None:
        """--dataloader_num_workers as given (None: decided from the data's path)."""
        return self.dataloader_num_workers if self.workers_chosen else None

    def configure_loaders(self, train, evaluation) -> None:
        """DataLoader settings for how the splits are held: images in one tensor need no workers; images read
        from disk (or pasted onto canvases from packed memory) get the split's workers, kept between epochs
        (persistent), with their batches in flight checked against the free shared memory (/dev/shm). The passes
        over a split (kNN monitor, features) use the same number of workers. `evaluation` None: no evaluation
        loader is made (its batches need no room)."""
        splits = [split for split in (train, evaluation) if split is not None]
        if not self.workers_chosen:
            self.dataloader_num_workers = max(split.num_workers for split in splits)
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers, self.dataloader_prefetch_factor = False, None
            return
        if not self.persistent_workers_chosen:
            self.dataloader_persistent_workers = True
        from .data.streaming import fit_workers_to_shared_memory

        # the training loader's prefetched batches wait while the persistent evaluation loader fills its own
        evaluation_bytes = 0 if evaluation is None else self.per_device_eval_batch_size * math.prod(evaluation.canvas)
        batch_bytes = self.per_device_train_batch_size * math.prod(train.canvas) + evaluation_bytes
        self.dataloader_num_workers, self.dataloader_prefetch_factor = fit_workers_to_shared_memory(
            self.dataloader_num_workers, self.dataloader_prefetch_factor or 2, batch_bytes,
            chosen=self.workers_chosen)
        for split in splits:
            if split.num_workers:
                split.num_workers = self.dataloader_num_workers

    def place_data_on_device(self, data) -> bool:
        """Whether to move an in-memory training split to the GPU (--data_on_device)."""
        if not data.in_memory:
            if self.data_on_device == "true":
                raise UsageError("--data_on_device true needs the images in memory; these are read from disk "
                                 "(--data_in_memory).")
            return False
        num_bytes = data.decoded_bytes
        if self.device.type == "cpu" or self.data_on_device == "false":
            return False
        if getattr(data, "images", True) is None and self.data_on_device != "true":
            return False  # packed images (sizes vary): on the GPU each batch would be pasted image by image
        if self.dataloader_num_workers > 0:  # forked worker processes cannot index tensors on the GPU
            if self.data_on_device == "true":
                raise UsageError("--data_on_device true needs --dataloader_num_workers 0: worker processes cannot "
                                 "read data in GPU memory (and need not: a batch there is one gather).")
            return False
        if self.data_on_device == "true":
            return True
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return num_bytes < 0.2 * free


@dataclass
class PretrainingArguments(ImageTrainingArguments):
    """The MAE paper's pretraining recipe (He et al. 2021, Table 8), scaled to CIFAR-10."""

    per_device_train_batch_size: int = field(default=512, metadata={"help": "Batch per device."})
    num_train_epochs: float = field(default=320, metadata={"help": "Epochs."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["pixel_values"], metadata={"help": "The MAE's target is its input."})
    knn_eval: bool = field(default=True, metadata={"help": "kNN accuracy (k=--knn_k) at each evaluation, if labels."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN evaluation."})
    knn_max_train_samples: int | None = field(
        default=None, metadata={"help": "Training images in the kNN bank (all by default)."})
    num_reconstructions: int = field(default=8, metadata={"help": "Images in reconstructions.png."})

    def __post_init__(self):
        if self.label_names != ["pixel_values"]:  # e.g. "bool_masked_pos" from older transformers examples
            print_once(f"note: --label_names {' '.join(self.label_names or [])} is ignored: the MAE's target is its "
                       "input, pixel_values (the evaluation loss needs it).", file=sys.stderr)
            self.label_names = ["pixel_values"]
        # 0 would fail only at the first evaluation, or (knn_k) report the accuracy of votes from no neighbour
        for flag in ("knn_k", "knn_max_train_samples", "num_reconstructions"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}.")
        super().__post_init__()


@dataclass
class FinetuneArguments(ImageTrainingArguments):
    """The MAE paper's fine-tuning recipe (Table 9) scaled to CIFAR-10; by default without its mixup/cutmix and
    RandAugment, which the strong-recipe flags below add (with random erasing, repeated augmentation and a weight
    EMA; configs/finetune_strong.yaml)."""

    random_init: bool = field(default=False, metadata={"help": "Fine-tune a randomly initialised encoder instead."})
    pooling: str = field(default="mean", metadata={"help": "'mean' of patch tokens (MAE paper) or 'cls'."})
    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise lr decay (1 disables)."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the encoder."})
    crop_min_scale: float = field(default=0.25, metadata={"help": "Random-resized-crop area range [min, 1]."})
    base_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate per 256 images of batch."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Batch per device."})
    num_train_epochs: float = field(default=100, metadata={"help": "Epochs."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing."})
    # The strong recipe (configs/finetune_strong.yaml); the defaults leave each part off.
    augment_policy: str = field(
        default="none",
        metadata={"help": "'randaugment' (--randaugment_num_ops ops per image at --randaugment_magnitude), "
                          "'trivialaugment' (one op, random magnitude) or 'none'. After crop/flip, on the device."})
    randaugment_num_ops: int = field(default=2, metadata={"help": "RandAugment: operations per image."})
    randaugment_magnitude: float = field(default=9.0, metadata={"help": "RandAugment: magnitude in [0, 10]."})
    randaugment_magnitude_std: float = field(
        default=0.5, metadata={"help": "RandAugment: std of the per-image normal jitter of the magnitude."})
    randaugment_op_prob: float = field(
        default=1.0, metadata={"help": "RandAugment: probability that each drawn op is applied (timm/DeiT: 0.5)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "Mixup Beta(alpha, alpha); 0 disables mixup."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "Cutmix Beta(alpha, alpha); 0 disables cutmix."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "With both mixup and cutmix on: probability that a batch uses cutmix."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability that a batch is mixed at all."})
    random_erasing: float = field(
        default=0.0, metadata={"help": "Probability of erasing a random rectangle of an image (normal noise)."})
    repeated_augmentations: int = field(
        default=1,
        metadata={"help": "Each batch holds every image this many times, differently augmented; an epoch still has "
                          "as many samples as images (so it sees 1/k of them, k times each)."})
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Keep an exponential moving average of the weights with this decay (e.g. 0.9999) and "
                          "evaluate it beside the trained weights (eval_ema_accuracy); 0 disables."})

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_decay > 0:  # 0 freezes the encoder; a negative value trains layers with negative rates
            raise ValueError(f"--layer_decay must be > 0 (1 disables it), got {self.layer_decay}.")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor must lie in [0, 1), got {self.label_smoothing_factor}.")
        from .augment import STRONG_RECIPE

        for part in STRONG_RECIPE:
            if part.check is not None:
                part.check(self)

    def augmenter(self):
        from .augment import RandAugment

        if self.augment_policy == "none":
            return None
        return RandAugment(self.randaugment_num_ops, self.randaugment_magnitude, self.randaugment_magnitude_std,
                           trivial=self.augment_policy == "trivialaugment", op_prob=self.randaugment_op_prob)

    def mixer(self, num_labels: int):
        """The batch mixer (`augment.MixupCutmix`, label smoothing folded into its soft targets), or None."""
        from .augment import MixupCutmix

        if not (self.mixup_alpha or self.cutmix_alpha):
            return None
        return MixupCutmix(num_labels, self.mixup_alpha, self.cutmix_alpha, self.mixup_switch_prob, self.mixup_prob,
                           self.label_smoothing_factor)

    def batch_transforms(self, config, eval_crop_fraction: float = 1.0):
        train, evaluation = super().batch_transforms(config, eval_crop_fraction)
        train.augment, train.random_erasing = self.augmenter(), self.random_erasing
        return train, evaluation

    def recipe(self) -> dict:
        """Every setting of the strong recipe's parts (`augment.STRONG_RECIPE`), for the results file."""
        from .augment import STRONG_RECIPE

        return {flag: getattr(self, flag) for part in STRONG_RECIPE for flag in (part.flag, *part.settings)}


def linear_weight_names(model: nn.Module) -> list[str]:
    """Parameters that get weight decay: weights of linear layers (not biases, norms, class/mask tokens)."""
    return [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear)]


def layer_id(name: str, num_layers: int) -> int:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest on top."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "mae.layers."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


class PerProcessSeed(TrainerCallback):
    """Under DDP, give each process its own random stream for training (seed + process index), as DeiT does:
    `set_seed` seeds every process alike, so otherwise all ranks would draw the same crops, flips, augmentations,
    mixing coefficients, drop-path and masking noise for their batches. The model is initialised before this (alike
    on every rank), and a resumed run then restores each rank's own saved random state."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + args.process_index)  # CPU and every CUDA device


class ImageTrainer(Trainer):
    """`Trainer` for `ImageDataset` batches: uint8 canvases (`pixel_values`, with `image_sizes`) are moved to the
    device, then cropped and augmented (training) or centre-cropped (evaluation) there. Weight decay on linear
    weights only; optional layer-wise learning-rate decay. Every step's loss and gradient norm feed a
    `DivergenceGuard` on the device; it is read at logging/evaluation/save steps and before every save, so
    non-finite weights are never saved. A checkpoint that fails to save is removed, not left half-written.

    Fine-tuning recipe (mae_hf/augment.py): `mixer` mixes each training batch into soft targets, trained with a
    soft-target cross-entropy; `repeated_augmentations` puts every image k times in a batch; `ema_decay` keeps a
    weight EMA, evaluated beside the trained weights (`eval_ema_*` metrics)."""

    def __init__(self, *args, train_transform, eval_transform, layer_decay: float = 1.0, mixer=None,
                 repeated_augmentations: int = 1, ema_decay: float = 0.0, device_decoder=None, **kwargs):
        # `non_blocking` without pinned memory (a CPU, data already on the GPU) is asked for on purpose: see
        # ImageTrainingArguments.
        unpinned = _DropMessage("`non_blocking` is enabled but `dataloader_pin_memory` is not")
        trainer_logger = std_logging.getLogger("transformers.trainer")
        trainer_logger.addFilter(unpinned)
        try:
            super().__init__(*args, **kwargs)
        finally:
            trainer_logger.removeFilter(unpinned)
        # The evaluation loop pads every batch's labels and logits along dim 1 to gather sequences of other lengths,
        # reading each tensor's shape back from the device to do so (a wait per batch). Image labels (batch,) and
        # logits (batch, classes) or (batch, patches, values) have the same sizes on every process: nothing to pad.
        self.accelerator.pad_across_processes = lambda tensor, *args, **kwargs: tensor
        self.device_decoder = device_decoder  # JPEG bytes -> canvases on the GPU (--decode_on_device)
        # Every training loss here is a mean over its micro-batch (the model's, the label smoother's, the soft-target
        # one), so the Trainer must divide it by the accumulation steps. It would not if it took the model (whose
        # forward has **kwargs) for one that normalises by the Trainer's label count itself.
        self.model_accepts_loss_kwargs = False
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.layer_decay = layer_decay
        self.divergence = DivergenceGuard()
        self.add_callback(self.divergence)
        self.add_callback(PerProcessSeed())
        self.run_settings = None  # set by runs.Run (a function: the settings now): written beside every saved model
        # Fine-tuning recipe (mae_hf/augment.py): batch mixing with soft targets, repeated augmentation, weight EMA.
        self.mixer, self.repeated_augmentations = mixer, repeated_augmentations
        self.ema = None
        if ema_decay:
            from .augment import WeightEMA

            self.ema = WeightEMA(ema_decay)
            self.add_callback(self.ema)

    def _decoded(self, inputs):
        """JPEG bytes from the workers (--decode_on_device) decoded into canvases on the GPU."""
        if "encoded_images" not in inputs:
            return inputs
        inputs = dict(inputs)
        inputs["pixel_values"] = self.device_decoder(inputs.pop("encoded_images"), inputs["image_sizes"])
        return inputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # decoded before the Trainer looks for the labels (pixel_values, for the MAE) to compute a loss
        return super().prediction_step(model, self._decoded(inputs), prediction_loss_only, ignore_keys)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(self._decoded(inputs))
        sizes = inputs.pop("image_sizes", None)  # where each image lies in its canvas (host): for the transform only
        if not self.model.training:
            return {**inputs, "pixel_values": self.eval_transform(inputs["pixel_values"], sizes)}
        inputs = {**inputs, "pixel_values": self.train_transform(inputs["pixel_values"], sizes)}
        if self.mixer is not None:
            inputs["pixel_values"], inputs["labels"] = self.mixer(inputs["pixel_values"], inputs["labels"])
        return inputs

    def floating_point_ops(self, inputs):
        if "encoded_images" in inputs:  # the estimate transformers makes from a batch of pixel values
            config = self.model.config
            pixels = len(inputs["encoded_images"]) * config.num_channels * config.image_size**2
            return 6 * pixels * self.model.num_parameters(exclude_embeddings=True)
        return super().floating_point_ops(inputs)

    # The crops' own random stream is part of the run's state: saved with the Trainer's random states in every
    # checkpoint, and restored with them, so a resumed run draws the crops the uninterrupted one would have.
    def _augmentation_state_file(self, folder: str) -> str:
        suffix = f"_{self.args.process_index}" if self.args.world_size > 1 else ""
        return os.path.join(folder, f"augmentation_rng_state{suffix}.pth")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = self.train_transform.state()
        if state is not None:
            torch.save(state, self._augmentation_state_file(output_dir))

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        path = None if checkpoint is None else self._augmentation_state_file(checkpoint)
        if path is not None and os.path.isfile(path):
            self.train_transform.load_state(torch.load(path, weights_only=True))

    def _leave_global_random_state_alone(self, loader):
        """A DataLoader draws its workers' base seed from torch's global random state each time it starts an
        epoch — except with persistent workers, whose epochs after the first draw nothing. A resumed run starts a
        new one, so the draws (and every random value after them: masking, augmentation) would differ from the
        uninterrupted run's. With a generator of its own, the loader takes nothing from the global state."""
        base = getattr(loader, "base_dataloader", loader)  # accelerate's loaders wrap the DataLoader that draws
        base.generator = torch.Generator().manual_seed(self.args.seed)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        return self._leave_global_random_state_alone(super().get_eval_dataloader(eval_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or not labels.is_floating_point() or labels.dim() != 2 or self.mixer is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Mixed batches: soft targets (label smoothing already folded in) and a soft-target cross-entropy; the
        # model's own loss would read float (batch, num_labels) labels as multi-label.
        from .augment import soft_target_cross_entropy

        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = soft_target_cross_entropy(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        if self.repeated_augmentations == 1:
            return super()._get_train_sampler(train_dataset)
        from .augment import RepeatedAugmentationSampler

        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed  # as the Trainer's own sampler
        return RepeatedAugmentationSampler(len(dataset), self.repeated_augmentations, seed)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.ema is not None and self.ema.shadow is not None:  # the averaged weights, on the same images
            with self.ema.applied():
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_ema"))
        return metrics

    def get_train_dataloader(self):
        # Full training batches keep shapes static for torch.compile; evaluation still sees every image.
        evaluation_setting, self.args.dataloader_drop_last = self.args.dataloader_drop_last, True
        try:
            return self._leave_global_random_state_alone(super().get_train_dataloader())
        finally:
            self.args.dataloader_drop_last = evaluation_setting

    def get_decay_parameter_names(self, model):
        if self.args.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return linear_weight_names(model)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.layer_decay == 1.0:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        num_layers = self.model.config.num_hidden_layers
        groups = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            depth = layer_id(name, num_layers)
            key = (depth, name in decay)
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": self.args.weight_decay if name in decay else 0.0,
                               "lr": self.args.learning_rate * self.layer_decay ** (num_layers + 1 - depth)}
            groups[key]["params"].append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        # Deepest (peak lr) groups first: the Trainer logs its first group's learning rate, which users read as the
        # run's learning rate; the layer-decayed ones are lower.
        ordered = [groups[key] for key in sorted(groups, key=lambda key: -key[0])]
        self.optimizer = optimizer_cls(ordered, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence.observe_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if not self.args.fp16:  # fp16's loss scaler skips steps with inf gradients by design
            self.divergence.observe_grad_norm(grad_norm)
        return grad_norm

    def save_model(self, output_dir=None, _internal_call=False):
        """Checks the weights first (nothing non-finite is ever saved). A checkpoint's model is saved in place (a
        checkpoint that fails is removed whole); the final model goes through `runs.saved_whole`: written aside,
        then moved into place, with signals held, so that neither Ctrl-C nor a full disk leaves a torn file."""
        self.divergence.check(self.args, self.state.global_step, self.model)
        target = output_dir or self.args.output_dir
        if _internal_call or not self.args.should_save:
            super().save_model(output_dir, _internal_call)
            if self.run_settings is not None and self.args.should_save:
                write_json(os.path.join(target, SETTINGS_NAME), self.run_settings(self.state.global_step))
            return
        with saved_whole(target, self.args) as staging:
            super().save_model(staging, _internal_call)
            if self.run_settings is not None:
                write_json(os.path.join(staging, SETTINGS_NAME), self.run_settings(self.state.global_step))

    def log(self, logs, start_time=None):
        stop = next((callback for callback in self.callback_handler.callbacks if isinstance(callback, StopOnSignal)),
                    None)
        if "train_runtime" in logs and stop is not None and stop.signum is not None:
            return  # a run stopped by a signal: its train metrics would read like a finished run's
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with removed_if_incomplete(folder, self.args):
            super()._save_checkpoint(model, trial)


class MAEPretrainer(ImageTrainer):
    """Adds to each evaluation: `reconstructions.png` of fixed images and masks, `loss_curve.png`, and the kNN
    accuracy of the frozen encoder (cosine, temperature-weighted votes) when labels exist."""

    def __init__(self, *args, preview=None, knn_data=None, knn_k: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.preview = preview  # (uint8 canvases, their sizes, noise)
        self.knn_data = knn_data  # (bank images, bank labels, query images, query labels); images: `ImageData`
        self.knn_k = knn_k

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.is_world_process_zero():
            extra = self.pretraining_extras(metric_key_prefix)
            if extra:
                self.log(extra)
                metrics.update(extra)
        return metrics

    def pretraining_extras(self, prefix: str = "eval") -> dict:
        from .features import extract_features, knn_predict
        from .visualize import grid_image, reconstruction_rows, save_loss_curve

        model, output_dir = self.model, self.args.output_dir
        history = os.path.join(output_dir, "reconstructions")
        os.makedirs(history, exist_ok=True)
        if self.preview is not None:
            images, sizes, noise = self.preview
            pixel_values = self.eval_transform(images.to(self.args.device), sizes)  # sizes: on the host
            grid = grid_image(reconstruction_rows(model, pixel_values, noise, bf16=self.args.bf16))
            grid.save(os.path.join(output_dir, "reconstructions.png"))
            grid.save(os.path.join(history, f"step_{self.state.global_step:07d}.png"))
        save_loss_curve(self.state.log_history, os.path.join(output_dir, "loss_curve.png"))
        if self.knn_data is None:
            return {}
        from .metrics import accuracy

        bank, bank_labels, queries, query_labels = self.knn_data
        features = [extract_features(model.mae, images, self.eval_transform, self.args.per_device_eval_batch_size,
                                     bf16=self.args.bf16) for images in (bank, queries)]
        predictions = knn_predict(features[0], bank_labels, features[1], ks=(self.knn_k,))[self.knn_k]
        return {f"{prefix}_knn_accuracy": accuracy(predictions, query_labels)}


class ThroughputCallback(TrainerCallback):
    """Says the plan before training (device, precision, steps), then the measured images/s of the whole pipeline
    (data + step) and the estimated time to finish: first after `measure_seconds` (and `MIN_STEPS` steps) past the
    warm-up, then again each time the measured time has grown `WINDOW_GROWTH`-fold, from the steps since the last
    estimate (a machine that gets busier, or idler, shows in the next one). Intervals containing an evaluation or a
    save are left out of the measurement."""

    WARMUP_STEPS = 2  # the first steps warm up (and compile)
    MIN_STEPS = 3
    WINDOW_GROWTH = 4  # estimates after 10 s, 40 s, 160 s, ... of measured steps: a few lines in a long run

    def __init__(self, images_per_step: int, slow_hint: str | None = None, measure_seconds: float = 10.0):
        self.images_per_step, self.slow_hint, self.measure_seconds = images_per_step, slow_hint, measure_seconds
        self.last_time = None
        self.steps = 0
        self.seconds = 0.0
        self.estimated = None  # (steps, seconds) measured at the last estimate

    @property
    def images_per_second(self) -> float | None:
        return self.steps * self.images_per_step / self.seconds if self.seconds > 0 else None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if state.is_world_process_zero:
            precision = getattr(args, "precision", None) or (
                "bf16 autocast" if args.bf16 else ("fp16" if args.fp16 else "fp32"))
            write_line(f"[plan] device {args.device} x{args.world_size}, {precision}, "
                       f"torch_compile={args.torch_compile}; "
                       f"{state.max_steps} steps of {self.images_per_step} images ({_epochs(args, train_dataloader)}), "
                       f"peak learning rate {args.learning_rate:.3g}")
            # Before any measurement: a GPU-sized run (millions of images) on a CPU is days, whatever the model.
            if self.slow_hint and args.device.type == "cpu" and state.max_steps * self.images_per_step > 2_000_000:
                write_line(f"[plan] {self.slow_hint}")
                self.slow_hint = None  # said once

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last_time is not None and state.global_step > self.WARMUP_STEPS:
            self.steps += 1
            self.seconds += now - self.last_time
        self.last_time = now
        steps, seconds = self.estimated or (0, 0.0)
        due = self.measure_seconds if self.estimated is None else self.WINDOW_GROWTH * seconds
        if not state.is_world_process_zero or self.steps < self.MIN_STEPS or self.seconds < due or \
                state.global_step >= state.max_steps:
            return
        window_steps, window_seconds = self.steps - steps, self.seconds - seconds
        remaining = (state.max_steps - state.global_step) * window_seconds / window_steps
        write_line(f"[plan] {'measured' if self.estimated is None else 're-measured'} "
                   f"{window_steps * self.images_per_step / window_seconds:,.0f} images/s over {window_steps} steps; "
                   f"about {_duration(remaining)} of training left (evaluations add to it)")
        self.estimated = (self.steps, self.seconds)

    def _skip_interval(self, *args, **kwargs):
        self.last_time = None

    on_evaluate = on_save = _skip_interval


def write_line(line: str) -> None:
    """Print a line of our own during training: on a line of its own above the Trainer's progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def _epochs(args, train_dataloader) -> str:
    """The epochs the run will make: --num_train_epochs, or what --max_steps amounts to when it caps the run."""
    if args.max_steps <= 0 or train_dataloader is None:
        return f"{args.num_train_epochs:g} epochs"
    steps_per_epoch = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)
    return f"max_steps {args.max_steps} = {args.max_steps / steps_per_epoch:.3g} epochs"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ---- the setup both training scripts share ---------------------------------------------------------------------------

@dataclass
class TrainingData:
    """What a training script trains and evaluates on: the model config, both splits (checked, maybe decoded), the
    GPU JPEG decoder (--decode_on_device, else None) and the evaluation crop."""

    config: MAEConfig
    train: object  # data.ImageData
    evaluation: object
    decoder: object
    crop_fraction: float

    def place(self, args) -> None:
        """--data_on_device: the training split moves to the GPU (its batches are then gathered there, unpinned)."""
        if args.place_data_on_device(self.train):
            self.train.to(args.device)
            args.dataloader_pin_memory = False

    def trainer_inputs(self, args, config, labels: bool, eval_noise=None) -> dict:
        """The Trainer's datasets, collator, batch transforms (for `config`'s size and normalisation) and decoder."""
        from .data import ImageDataset, collate

        encoded = self.decoder is not None
        train_transform, eval_transform = args.batch_transforms(config, self.crop_fraction)
        return {"train_dataset": ImageDataset(self.train, labels=labels, encoded=encoded),
                "eval_dataset": ImageDataset(self.evaluation, labels=labels, noise=eval_noise, encoded=encoded),
                "data_collator": collate, "train_transform": train_transform, "eval_transform": eval_transform,
                "device_decoder": self.decoder}


def prepare_training(model_args, data_args, args, *, require_labels: bool = False, check=None, check_config=None,
                     **fresh_defaults) -> TrainingData:
    """Config (`fresh_defaults` for a model trained from scratch; `check_config(config)` before any data), then the
    splits (`check(train, evaluation)` and, when training, one full batch checked before any image is decoded), their
    DataLoader settings, the device decoder and the evaluation crop."""
    from .data import device_decoder, eval_crop_fraction

    config = build_config(model_args, **fresh_defaults)
    if check_config is not None:
        check_config(config)

    def before_decoding(train, evaluation):
        if args.do_train:
            args.check_enough_images(len(train))
        if check is not None:
            check(train, evaluation)

    train, evaluation = load_image_splits(data_args, config.image_size, config.num_channels,
                                          require_labels=require_labels, token=model_args.token,
                                          num_workers=args.requested_workers(), check=before_decoding,
                                          progress=not args.disable_tqdm)
    args.configure_loaders(train, evaluation)
    decoder = device_decoder(data_args, config.num_channels, args.device, train, evaluation)
    return TrainingData(config, train, evaluation, decoder, eval_crop_fraction(data_args, config.image_size, train))
