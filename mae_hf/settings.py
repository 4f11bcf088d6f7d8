"""What makes a training run what it is, as `run_settings.json` records it (in the output folder and in every
checkpoint): the model config and starting point, the data and the recipe. A resume compares them (runs.Run)."""

import dataclasses
import json
import os

from .configuration_mae import MAEConfig
from .data import source_identity
from .inputs import read_json_object
from .redaction import redact

SETTINGS_NAME = "run_settings.json"  # what the run was started with (and its resumes); copied into each checkpoint
# TrainingArguments that shape the result: a resume that changes one of them is not the run that was started.
RECIPE_FIELDS = ("learning_rate", "weight_decay", "decay_all_parameters", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "optim", "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps",
                 "gradient_accumulation_steps", "crop_min_scale", "horizontal_flip", "seed", "layer_decay",
                 "label_smoothing_factor", "drop_path_rate", "pooling", "random_init", "bf16", "fp16", "torch_compile")
# Where and how fast, not what: the batches are the same (a run may resume reading from disk what it held in memory).
DATA_FIELDS_IGNORED = ("cache_dir", "preprocessing_num_workers", "data_in_memory", "decode_on_device")


def _where(value):
    """A local path as an absolute one (a resume from another working folder compares alike); else `value` as is."""
    if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value


def run_settings(config, data_args, args, model_args) -> dict:
    """The settings that make a run what it is: the model config and starting point, the data and the recipe."""
    config_values = config.to_dict()
    model = {key: config_values[key] for key in sorted(MAEConfig.__annotations__) if key in config_values}
    model["num_labels"] = config.num_labels  # the classifier's head
    model["model_name_or_path"] = _where(model_args.model_name_or_path)  # the weights the run started from
    data = {field.name: _where(getattr(data_args, field.name)) for field in dataclasses.fields(data_args)
            if field.name not in DATA_FIELDS_IGNORED}
    data.update(source_identity(data_args))  # what the data holds, not only where (a resume compares it)
    recipe = {name: getattr(args, name) for name in RECIPE_FIELDS if hasattr(args, name)}
    if hasattr(args, "recipe"):  # fine-tuning's augmentation recipe
        recipe.update(args.recipe())
    recipe["global_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    # as written (JSON values: an enum as its value; tokens redacted), so that a resume compares like with like
    return redact(json.loads(json.dumps({"model": model, "data": data, "recipe": recipe}, default=str)))


def saved_settings(checkpoint: str) -> dict:
    """The checkpoint's settings file; from a checkpoint written before it existed, its model config alone."""
    path = os.path.join(checkpoint, SETTINGS_NAME)
    if os.path.isfile(path):
        return read_json_object(path)
    config = read_json_object(os.path.join(checkpoint, "config.json"))
    return {"model": {key: config[key] for key in sorted(MAEConfig.__annotations__) if key in config}}
