"""Training with the Hugging Face `Trainer`: image batches arrive as uint8 and are augmented on the device,
parameter groups follow the MAE recipe, a non-finite loss, gradient norm or weight stops the run before anything is
saved from it (`DivergenceGuard`), and pretraining evaluations also draw reconstructions and measure kNN accuracy."""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .augment import RepeatedAugmentationSampler, WeightEMA, soft_target_cross_entropy
from .cli import dropped_messages
from .configuration_mae import MAEConfig
from .data import ImageData, ImageDataset, collate, device_decoder, eval_crop_fraction, load_image_splits
from .features import knn_predict
from .inputs import write_json
from .loading import build_config
from .metrics import accuracy
from .probes import encode_frozen
from .results import run_record
from .runs import (
    NonFiniteError,
    StopOnSignal,
    _step_of,
    checkpoint_problem,
    checkpoints,
    removed_if_incomplete,
    saved_whole,
)
from .settings import SETTINGS_NAME
from .visualize import grid_image, reconstruction_rows, save_loss_curve


def layer_id(name: str, num_layers: int) -> int:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest on top."""
    if ".embeddings." in f".{name}":
        return 0
    marker = "mae.layers."
    if marker in name:
        return int(name.split(marker, 1)[1].split(".", 1)[0]) + 1
    return num_layers + 1


def last_finite_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint whose weights, loaded, are all finite."""
    from safetensors import safe_open

    def finite(folder):  # one tensor at a time: a checkpoint can be larger than the free memory
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights:
            tensors = (weights.get_tensor(name) for name in weights.keys())
            return all(tensor.isfinite().all() for tensor in tensors if tensor.is_floating_point())

    return next((folder for folder in checkpoints(output_dir) if checkpoint_problem(folder) is None and finite(folder)),
                None)


class DivergenceGuard(TrainerCallback):
    """Records on the device, every step, whether a loss or gradient norm was non-finite (`observe_*`); `check` reads
    that and the weights when logging, evaluating or saving, and raises `NonFiniteError` naming the last finite save."""

    def __init__(self):
        self.flags = None  # [loss non-finite, gradient norm non-finite] since the start
        self.checked_step = 0

    def _record(self, index: int, value) -> None:
        if value is None:
            return
        if not isinstance(value, torch.Tensor):  # DeepSpeed reports the gradient norm as a float
            value = torch.tensor(float(value), device=None if self.flags is None else self.flags.device)
        if self.flags is None:
            self.flags = torch.zeros(2, dtype=torch.bool, device=value.device)
        self.flags[index].logical_or_(value.detach().isfinite().logical_not_())  # in place: a few tiny kernels

    def observe_loss(self, loss) -> None:
        self._record(0, loss)

    def observe_grad_norm(self, grad_norm) -> None:
        self._record(1, grad_norm)

    def check(self, args, step: int, model) -> None:
        loss_bad = grad_bad = False
        if self.flags is not None:
            flags = self.flags.to(torch.int32)
            if args.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            loss_bad, grad_bad = (bool(flag) for flag in flags.tolist())  # the one host read
        weights_bad = not torch.stack([parameter.isfinite().all() for parameter in model.parameters()]).all()
        if loss_bad or grad_bad or weights_bad:
            what = [name for name, bad in (("the loss", loss_bad), ("the gradient norm", grad_bad),
                                           ("the weights", weights_bad)) if bad]
            raise NonFiniteError(self._message(args, " and ".join(what), step))
        self.checked_step = step

    def _message(self, args, what: str, step: int) -> str:
        finite = last_finite_checkpoint(args.output_dir)
        if finite is None:
            kept = (f"No checkpoint with finite weights exists in {args.output_dir}; start again with a lower "
                    "--learning_rate, more --warmup_steps or fp32.")
        else:
            kept = (f"The last checkpoint with finite weights is {finite} (step {_step_of(finite)}); continue from "
                    f"it with a lower --learning_rate, more --warmup_steps or fp32: add --resume_from_checkpoint "
                    f"{finite} --allow_config_change true.")
        when = f"at step {step}" if step == self.checked_step + 1 else \
            f"between steps {self.checked_step + 1} and {step}"
        return f"Training diverged: {what} became non-finite {when}. Nothing was saved from that state. {kept}"

    def _check_if_due(self, args, state, control, model=None, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save:
            self.check(args, state.global_step, model)

    on_step_end = on_epoch_end = _check_if_due


class PerProcessSeed(TrainerCallback):
    """Under DDP, each process trains on its own random stream (seed + process index, as DeiT), set after the model
    is initialised: `set_seed` seeds all alike, so every rank would draw the same crops, drop-path and masks."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + args.process_index)  # CPU and every CUDA device


class ImageTrainer(Trainer):
    """`Trainer` for `ImageDataset` batches (uint8 canvases, cropped and augmented on the device), with weight decay
    on linear weights, optional layer-wise lr decay, a `DivergenceGuard`, and the fine-tuning recipe's batch `mixer`,
    `repeated_augmentations` and weight EMA (`ema_decay`: `eval_ema_*` metrics; mae_hf/augment.py)."""

    def __init__(self, *args, train_transform, eval_transform, layer_decay: float = 1.0, mixer=None,
                 repeated_augmentations: int = 1, ema_decay: float = 0.0, device_decoder=None, **kwargs):
        # `non_blocking` without pinned memory (a CPU, data already on the GPU) is on purpose: ImageTrainingArguments
        with dropped_messages("transformers.trainer", "`non_blocking` is enabled but `dataloader_pin_memory` is not"):
            super().__init__(*args, **kwargs)
        # Nothing to pad: image labels and logits have the same sizes on every process (padding reads shapes back).
        self.accelerator.pad_across_processes = lambda tensor, *args, **kwargs: tensor
        self.device_decoder = device_decoder  # JPEG bytes -> canvases on the GPU (--decode_on_device)
        # Every loss here is a micro-batch mean: the Trainer must divide it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self.train_transform, self.eval_transform, self.layer_decay = train_transform, eval_transform, layer_decay
        self.divergence = DivergenceGuard()
        self.add_callback(self.divergence)
        self.add_callback(PerProcessSeed())
        self.run_settings = None  # set by runs.Run (a function: the settings now): written beside every saved model
        self.mixer, self.repeated_augmentations = mixer, repeated_augmentations
        self.ema = WeightEMA(ema_decay) if ema_decay else None
        if self.ema is not None:
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

    # The crops' own random stream is saved and restored with the Trainer's: a resumed run draws the same crops.
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
        if checkpoint is not None and os.path.isfile(path := self._augmentation_state_file(checkpoint)):
            self.train_transform.load_state(torch.load(path, weights_only=True))

    def _leave_global_random_state_alone(self, loader):
        """A generator of the loader's own, so that its seeds (drawn per epoch) leave the global stream alone."""
        base = getattr(loader, "base_dataloader", loader)  # accelerate's loaders wrap the DataLoader that draws
        base.generator = torch.Generator().manual_seed(self.args.seed)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        return self._leave_global_random_state_alone(super().get_eval_dataloader(eval_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or not labels.is_floating_point() or labels.dim() != 2 or self.mixer is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Mixed batches' soft targets (smoothing folded in): the model's loss would read them as multi-label.
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = soft_target_cross_entropy(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        if self.repeated_augmentations == 1:
            return super()._get_train_sampler(train_dataset)
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
        # weights of linear layers only (not biases, norms, class/mask tokens)
        return [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                if isinstance(module, nn.Linear)]

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
        # Peak-lr groups first: the Trainer logs the first group's learning rate, which users read as the run's.
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
        """Nothing non-finite is saved; the final model goes through `runs.saved_whole`, a checkpoint's in place."""
        self.divergence.check(self.args, self.state.global_step, self.model)
        target = output_dir or self.args.output_dir
        final = not _internal_call and self.args.should_save
        with saved_whole(target, self.args) if final else nullcontext(target) as folder:
            super().save_model(folder, _internal_call)
            if self.run_settings is not None and self.args.should_save:
                write_json(os.path.join(folder, SETTINGS_NAME), self.run_settings(self.state.global_step))

    def log(self, logs, start_time=None):
        if "train_runtime" in logs and any(isinstance(callback, StopOnSignal) and callback.signum is not None
                                           for callback in self.callback_handler.callbacks):
            return  # a run stopped by a signal: its train metrics would read like a finished run's
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with removed_if_incomplete(folder, self.args):
            super()._save_checkpoint(model, trial)


class MAEPretrainer(ImageTrainer):
    """Adds to each evaluation `reconstructions.png`, `loss_curve.png` and, with labels, the encoder's kNN accuracy."""

    def __init__(self, *args, preview=None, knn_data=None, knn_k: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        self.preview = preview  # (uint8 canvases, their sizes, noise)
        self.knn_data = knn_data  # (bank images, bank labels, query images, query labels); images: `ImageData`
        self.knn_k = knn_k

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if not self.is_world_process_zero():
            return metrics
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
        if self.knn_data is not None:
            bank, bank_labels, queries, query_labels = self.knn_data
            features = [encode_frozen(model.mae, images, self.eval_transform, self.args.per_device_eval_batch_size,
                                      bf16=self.args.bf16)[0] for images in (bank, queries)]
            predictions = knn_predict(features[0], bank_labels, features[1], ks=(self.knn_k,))[self.knn_k]
            knn = {f"{metric_key_prefix}_knn_accuracy": accuracy(predictions, query_labels)}
            self.log(knn)
            metrics.update(knn)
        return metrics


class ThroughputCallback(TrainerCallback):
    """Says the plan before training, then the measured images/s and the time left: after `measure_seconds` past the
    warm-up, then from the steps since, each time the measured time has grown `WINDOW_GROWTH`-fold."""

    WARMUP_STEPS = 2  # the first steps warm up (and compile)
    MIN_STEPS = 3
    WINDOW_GROWTH = 4  # estimates after 10 s, 40 s, 160 s, ... of measured steps: a few lines in a long run

    def __init__(self, images_per_step: int, slow_hint: str | None = None, measure_seconds: float = 10.0):
        self.images_per_step, self.slow_hint, self.measure_seconds = images_per_step, slow_hint, measure_seconds
        self.last_time, self.steps, self.seconds = None, 0, 0.0
        self.estimated = None  # (steps, seconds) measured at the last estimate

    @property
    def images_per_second(self) -> float | None:
        return self.steps * self.images_per_step / self.seconds if self.seconds > 0 else None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if state.is_world_process_zero:  # plain TrainingArguments say no precision of their own
            precision = getattr(args, "precision", None) or ("bf16 autocast" if args.bf16 else "fp16" if args.fp16
                                                             else "fp32")
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
    """What a training script trains and evaluates on (`prepare_training`)."""

    config: MAEConfig
    train: ImageData
    evaluation: ImageData
    decoder: object  # streaming.DeviceJPEGDecoder, or None
    crop_fraction: float

    def place(self, args) -> None:
        """--data_on_device: the training split moves to the GPU (its batches are then gathered there, unpinned)."""
        if args.place_data_on_device(self.train):
            self.train.to(args.device)
            args.dataloader_pin_memory = False

    def trainer_inputs(self, args, config, labels: bool, eval_noise=None) -> dict:
        """The Trainer's datasets, collator, batch transforms (for `config`'s size and normalisation) and decoder."""
        encoded = self.decoder is not None
        train_transform, eval_transform = args.batch_transforms(config, self.crop_fraction)
        return {"train_dataset": ImageDataset(self.train, labels=labels, encoded=encoded),
                "eval_dataset": ImageDataset(self.evaluation, labels=labels, noise=eval_noise, encoded=encoded),
                "data_collator": collate, "train_transform": train_transform, "eval_transform": eval_transform,
                "device_decoder": self.decoder}

    def record(self, data_args, args) -> dict:
        """What both scripts' result files record: `results.run_record` and the recipe settings they share."""
        return {**run_record(data_args, self.train, self.evaluation, device=args.device, world_size=args.world_size,
                             bf16=args.bf16, seed=args.seed, crop_fraction=self.crop_fraction,
                             precision=args.precision),
                "global_batch_size": args.global_batch_size, "learning_rate": args.learning_rate,
                "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                "crop_min_scale": args.crop_min_scale, "horizontal_flip": args.horizontal_flip}


def prepare_training(model_args, data_args, args, *, require_labels: bool = False, check=None, check_config=None,
                     **fresh_defaults) -> TrainingData:
    """Config (`fresh_defaults` for a new model; `check_config(config)`), then the splits (`check(train, evaluation)`
    and one full batch checked before any image is decoded), their loaders, the device decoder and evaluation crop."""
    config = build_config(model_args, **fresh_defaults)
    if check_config is not None:
        check_config(config)

    def before_decoding(train, evaluation):
        if args.do_train:
            args.check_enough_images(len(train))
        if check is not None:
            check(train, evaluation)

    # load_image_splits: this module's name, which tests replace
    train, evaluation = load_image_splits(data_args, config.image_size, config.num_channels,
                                          require_labels=require_labels, token=model_args.token,
                                          num_workers=args.dataloader_num_workers if args.workers_chosen else None,
                                          check=before_decoding, progress=not args.disable_tqdm)
    args.configure_loaders(train, evaluation)
    decoder = device_decoder(data_args, config.num_channels, args.device, train, evaluation)
    return TrainingData(config, train, evaluation, decoder, eval_crop_fraction(data_args, config.image_size, train))


def evaluate_saved(trainer, model_args, evaluation, scores) -> None:
    """--do_train false: the loaded model on the evaluation split -> eval_results.json, and `scores(metrics)` said."""
    args, metrics = trainer.args, trainer.evaluate()
    trainer.save_metrics("eval", dict(metrics, eval_samples=len(evaluation), bf16=args.bf16, precision=args.precision))
    print(f"[eval] {model_args.model_name_or_path} on {evaluation.split} ({args.precision}): {scores(metrics)} -> "
          f"{args.output_dir}/eval_results.json", flush=True)
