"""`TrainingArguments` of the two recipes: the image-training settings they share (`ImageTrainingArguments`: batches
augmented on the device, the MAE learning-rate rule, precision, loaders), and pretraining's and fine-tuning's own."""

import math
import sys
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from .augment import STRONG_RECIPE, MixupCutmix, chained
from .cli import UsageError, dropped_messages, flag, print_once
from .data import BatchTransform
from .data.streaming import fit_workers_to_shared_memory
from .precision import BF16_AUTO_HELP, decide_bf16
from .redaction import is_token_name


@dataclass
class ImageTrainingArguments(TrainingArguments):
    """Both recipes' settings: batches augmented on the device, the MAE rule peak lr = base lr x total batch / 256."""

    output_dir: str | None = flag(None, "Where the model, checkpoints and results go.")
    learning_rate: float | None = flag(None, "Peak learning rate. Default: --base_learning_rate x total batch / 256.")
    base_learning_rate: float = flag(
        1.5e-4, "Learning rate per 256 images of total batch (used without --learning_rate).")
    crop_min_scale: float = flag(0.2, "Random-resized-crop area range [crop_min_scale, 1]; 1 disables cropping.")
    horizontal_flip: bool = flag(True, "Random horizontal flips.")
    data_on_device: str = flag(
        "auto", "Keep the decoded uint8 training set on the GPU: 'auto' (when it fits easily), 'true', 'false'. Only "
        "for images held in memory (--data_in_memory).")
    dataloader_num_workers: int | None = flag(
        None, "DataLoader worker processes per training process. Images read from disk are decoded by them (default: "
        "this process's share of the CPUs, one left for it); images held in memory need none (default 0).")
    dataloader_persistent_workers: bool | None = flag(
        None, "Keep DataLoader workers between epochs and evaluations (default: on when there are workers).")
    bf16: bool | None = flag(
        None, f"bf16 autocast: {BF16_AUTO_HELP} fp32 on those GPUs computes matrix products in TF32 unless --tf32 "
        "false; the plan line says which and why.")
    torch_compile: bool | None = flag(None, "torch.compile: true, false or auto (the default: on with CUDA).")
    per_device_eval_batch_size: int = flag(512, "Evaluation batch per device.")
    weight_decay: float = flag(0.05, "AdamW weight decay, on linear weights only unless --decay_all_parameters.")
    decay_all_parameters: bool = flag(
        False, "Apply weight decay to every parameter (biases, norms, tokens too), as plain AdamW does.")
    lr_scheduler_type: str = flag("cosine", "Schedule after warmup.")
    warmup_steps: float = flag(0.05, "Warmup: steps, or a fraction of all steps if < 1.")
    eval_strategy: str = flag("steps", "When to evaluate.")
    eval_steps: float | None = flag(0.1, "Evaluate every N steps (fraction if < 1).")
    save_steps: float = flag(0.1, "Checkpoint every N steps (fraction if < 1).")
    save_total_limit: int | None = flag(2, "Checkpoints kept.")
    logging_steps: float = flag(0.01, "Log every N steps (fraction if < 1).")
    total_train_batch_size: int | None = flag(
        None, "The batch of one optimizer step, across processes: sets --gradient_accumulation_steps to this / "
        "(--per_device_train_batch_size x processes), which must divide it (the MAE recipes' 4096 on any number of "
        "GPUs).")
    remove_unused_columns: bool = flag(False, "Always False here: batches are prebuilt tensors with no unused columns.")
    do_train: bool | None = flag(
        None, "Train. With neither --do_train nor --do_eval: train, then evaluate. --do_eval alone does not train "
        "(--do_eval --model_name_or_path DIR evaluates a saved model); evaluation is on unless --do_eval false (the "
        "default --eval_strategy steps turns it on, as in TrainingArguments).")
    do_eval: bool | None = flag(
        None, "Evaluate (see --do_train). Evaluations also run during training by --eval_strategy; --do_eval false "
        "turns those off too.")
    warmup_ratio: float | None = flag(
        None, "transformers 4.x's name for a warmup fraction: the same as --warmup_steps with a value < 1.")
    ddp_find_unused_parameters: bool | None = flag(False, "See TrainingArguments.")
    ddp_broadcast_buffers: bool | None = flag(
        False, "DDP: copy the buffers from the first process before every forward. Off: the models' buffers (sin-cos "
        "positions) never change, so the copy would only cost time.")
    logging_nan_inf_filter: bool = flag(
        False, "Kept False: the Trainer's filter tests every step's loss on the host (a GPU sync per step); a "
        "non-finite loss stops the run instead (checked on the device).")
    allow_config_change: bool = flag(
        False, "Resume even though the model, data or recipe settings differ from the checkpoint's (both are recorded "
        "in the run's summary).")

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
            # Batches reach the GPU without the host waiting (accelerate's default copies block); a no-op on a CPU.
            self.accelerator_config = {"non_blocking": True}
        # The warning that compile's speedups need an Ampere GPU reads as a fault on a CPU (docs/cpu_speed.md).
        with dropped_messages("transformers.training_args", "The speedups for torchdynamo mostly come with GPU"):
            super().__post_init__()  # also: do_eval becomes True when eval_strategy is not "no" (TrainingArguments')
        # accelerate builds no FSDP for CPU processes (they would train as plain DDP); the Trainer refuses one process.
        if self.fsdp and self.use_cpu and self.world_size > 1:
            raise UsageError("--fsdp shards the model over GPU processes; on CPU processes accelerate trains without "
                             "it (plain DDP, every process holding the whole model), so it would not save the memory "
                             "it promises. Leave --fsdp out on a CPU, or run on GPUs (docs/pretraining.md).")
        if not (self.do_train or self.do_eval):
            raise ValueError("--do_train and --do_eval are both off: nothing to do. Pass --do_train true and/or "
                             "--do_eval true (or neither: train, then evaluate).")
        if self.total_train_batch_size is not None:
            total, per_step = self.total_train_batch_size, self.per_device_train_batch_size * self.world_size
            if total < 1 or total % per_step:
                raise ValueError(f"--total_train_batch_size {total} is not a multiple of --per_device_train_batch_size "
                                 f"{self.per_device_train_batch_size} x {self.world_size} process(es) = {per_step}: "
                                 "pick a per-device batch that divides it.")
            steps = total // per_step
            if self.gradient_accumulation_steps not in (1, steps):
                raise ValueError(f"--gradient_accumulation_steps {self.gradient_accumulation_steps} and "
                                 f"--total_train_batch_size {self.total_train_batch_size} (= {steps} step(s) here) "
                                 "disagree; give one of them.")
            self.gradient_accumulation_steps = steps
        if not learning_rate_given:
            self.learning_rate = self.base_learning_rate * self.global_batch_size / 256

    def __getstate__(self):
        """A pickled copy (training_args.bin, beside every saved model and checkpoint) holds no Hub token."""
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
        # --push_to_hub: the script pushes its finished folder at the end (the Trainer's push would upload a bare one).
        self.push_output_to_hub, self.push_to_hub = self.push_to_hub, False
        if self.push_output_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/mae-cifar10).")

    def check_numbers(self) -> None:
        """Sizes, steps and rates that transformers or torch would refuse late, or never, each named as the flag."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be a positive number of steps (or -1: train for --num_train_epochs), "
                             f"got {self.max_steps}.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be positive, got {self.num_train_epochs}.")
        for name in ("learning_rate", "base_learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (value < 0 or value != value or value == float("inf")):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}.")

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
        """(train, eval) `BatchTransform`s: crop + flip seeded with --seed and the process index; the centre crop."""
        crop = (self.crop_min_scale, 1.0) if self.crop_min_scale < 1 else None
        return (BatchTransform.for_model(config, crop_scale=crop, hflip=self.horizontal_flip,
                                         seed=self.seed + self.process_index, training=True),
                BatchTransform.for_model(config, eval_crop_fraction=eval_crop_fraction))

    def configure_loaders(self, train, evaluation) -> None:
        """Loader workers for how the splits are held: none for one tensor, else the split's, persistent and fitted to
        the free /dev/shm (also for the passes over a split). `evaluation` None: no evaluation loader is made."""
        splits = [split for split in (train, evaluation) if split is not None]
        if not self.workers_chosen:
            self.dataloader_num_workers = max(split.num_workers for split in splits)
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers, self.dataloader_prefetch_factor = False, None
            return
        if not self.persistent_workers_chosen:
            self.dataloader_persistent_workers = True
        # the training loader's prefetched batches wait while the persistent evaluation loader fills its own
        evaluation_bytes = 0 if evaluation is None else self.per_device_eval_batch_size * math.prod(evaluation.canvas)
        batch_bytes = self.per_device_train_batch_size * math.prod(train.canvas) + evaluation_bytes
        self.dataloader_num_workers, self.dataloader_prefetch_factor = fit_workers_to_shared_memory(
            self.dataloader_num_workers, self.dataloader_prefetch_factor or 2, batch_bytes, chosen=self.workers_chosen)
        for split in splits:
            if split.num_workers:
                split.num_workers = self.dataloader_num_workers

    def place_data_on_device(self, data) -> bool:
        """Whether to move an in-memory training split to the GPU (--data_on_device)."""
        forced = self.data_on_device == "true"
        if not data.in_memory:
            if forced:
                raise UsageError("--data_on_device true needs the images in memory; these are read from disk "
                                 "(--data_in_memory).")
            return False
        if self.device.type == "cpu" or self.data_on_device == "false":
            return False
        if data.packed is not None and not forced:
            return False  # packed images (sizes vary): on the GPU each batch would be pasted image by image
        if self.dataloader_num_workers > 0:  # forked worker processes cannot index tensors on the GPU
            if forced:
                raise UsageError("--data_on_device true needs --dataloader_num_workers 0: worker processes cannot "
                                 "read data in GPU memory (and need not: a batch there is one gather).")
            return False
        return forced or (self.device.type == "cuda"
                          and data.decoded_bytes < 0.2 * torch.cuda.mem_get_info(self.device)[0])


@dataclass
class PretrainingArguments(ImageTrainingArguments):
    """The MAE paper's pretraining recipe (He et al. 2021, Table 8), scaled to CIFAR-10."""

    per_device_train_batch_size: int = flag(512, "Batch per device.")
    num_train_epochs: float = flag(320, "Epochs.")
    adam_beta2: float = flag(0.95, "AdamW beta2.")
    label_names: list[str] | None = flag(
        help="The MAE's target is its input.", default_factory=lambda: ["pixel_values"])
    knn_eval: bool = flag(True, "kNN accuracy (k=--knn_k) at each evaluation, if labels.")
    knn_k: int = flag(20, "Neighbours of the kNN evaluation.")
    knn_max_train_samples: int | None = flag(None, "Training images in the kNN bank (all by default).")
    num_reconstructions: int = flag(8, "Images in reconstructions.png.")

    def __post_init__(self):
        if self.label_names != ["pixel_values"]:  # e.g. "bool_masked_pos" from older transformers examples
            print_once(f"note: --label_names {' '.join(self.label_names or [])} is ignored: the MAE's target is its "
                       "input, pixel_values (the evaluation loss needs it).", file=sys.stderr)
            self.label_names = ["pixel_values"]
        # 0 would fail only at the first evaluation, or (knn_k) report the accuracy of votes from no neighbour
        for name in ("knn_k", "knn_max_train_samples", "num_reconstructions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        super().__post_init__()


@dataclass
class FinetuneArguments(ImageTrainingArguments):
    """The MAE paper's fine-tuning recipe (Table 9) scaled to CIFAR-10; the strong recipe's parts
    (`augment.STRONG_RECIPE`, configs/finetune_strong.yaml) are flags below, off by default."""

    random_init: bool = flag(False, "Fine-tune a randomly initialised encoder instead.")
    pooling: str = flag("mean", "'mean' of patch tokens (MAE paper) or 'cls'.")
    layer_decay: float = flag(0.75, "Layer-wise lr decay (1 disables).")
    drop_path_rate: float = flag(0.1, "Stochastic depth of the encoder.")
    crop_min_scale: float = flag(0.25, "Random-resized-crop area range [min, 1].")
    base_learning_rate: float = flag(5e-4, "Learning rate per 256 images of batch.")
    per_device_train_batch_size: int = flag(256, "Batch per device.")
    num_train_epochs: float = flag(100, "Epochs.")
    label_smoothing_factor: float = flag(0.1, "Label smoothing.")
    augment_policy: str = flag(
        "none", "'randaugment' (--randaugment_num_ops ops per image at --randaugment_magnitude), 'trivialaugment' "
        "(one op, random magnitude) or 'none'. After crop/flip, on the device.")
    randaugment_num_ops: int = flag(2, "RandAugment: operations per image.")
    randaugment_magnitude: float = flag(9.0, "RandAugment: magnitude in [0, 10].")
    randaugment_magnitude_std: float = flag(0.5, "RandAugment: std of the per-image normal jitter of the magnitude.")
    randaugment_op_prob: float = flag(1.0, "RandAugment: probability that each drawn op is applied (timm/DeiT: 0.5).")
    mixup_alpha: float = flag(0.0, "Mixup Beta(alpha, alpha); 0 disables mixup.")
    cutmix_alpha: float = flag(0.0, "Cutmix Beta(alpha, alpha); 0 disables cutmix.")
    mixup_switch_prob: float = flag(0.5, "With both mixup and cutmix on: probability that a batch uses cutmix.")
    mixup_prob: float = flag(1.0, "Probability that a batch is mixed at all.")
    random_erasing: float = flag(0.0, "Probability of erasing a random rectangle of an image (normal noise).")
    repeated_augmentations: int = flag(
        1, "Each batch holds every image this many times, differently augmented; an epoch still has as many samples "
        "as images (so it sees 1/k of them, k times each).")
    ema_decay: float = flag(
        0.0, "Keep an exponential moving average of the weights with this decay (e.g. 0.9999) and evaluate it beside "
        "the trained weights (eval_ema_accuracy); 0 disables.")

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_decay > 0:  # 0 freezes the encoder; a negative value trains layers with negative rates
            raise ValueError(f"--layer_decay must be > 0 (1 disables it), got {self.layer_decay}.")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor must lie in [0, 1), got {self.label_smoothing_factor}.")
        for part in STRONG_RECIPE:
            value = getattr(self, part.flag)
            if part.valid is not None and not part.valid(value):
                raise ValueError(f"--{part.flag} {part.rule.format(value=value)}")
            if part.check is not None:
                part.check(self)

    def mixer(self, num_labels: int):
        """The batch mixer (`augment.MixupCutmix`, label smoothing folded into its soft targets), or None."""
        if not (self.mixup_alpha or self.cutmix_alpha):
            return None
        return MixupCutmix(num_labels, self.mixup_alpha, self.cutmix_alpha, self.mixup_switch_prob, self.mixup_prob,
                           self.label_smoothing_factor)

    def batch_transforms(self, config, eval_crop_fraction: float = 1.0):
        """Crop/flip, then the strong recipe's batch ops that are on (`augment.STRONG_RECIPE`) and random erasing."""
        train, evaluation = super().batch_transforms(config, eval_crop_fraction)
        train.augment = chained([part.build(self) for part in STRONG_RECIPE
                                 if part.build is not None and getattr(self, part.flag) != part.off])
        train.random_erasing = self.random_erasing
        return train, evaluation

    def recipe(self) -> dict:
        """Every setting of the strong recipe's parts (`augment.STRONG_RECIPE`), for the results file."""
        return {flag: getattr(self, flag) for part in STRONG_RECIPE for flag in (part.flag, *part.settings)}
