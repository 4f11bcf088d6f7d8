"""Evaluating a frozen encoder: its flags, and the runner that checks them, runs the encoder once per image and hands
what that pass leaves to each wanted protocol of `probes.FROZEN_PROTOCOLS`."""

import math
import os
import time
from dataclasses import dataclass

import torch

from . import probes
from .cli import UsageError, flag
from .data import BatchTransform, eval_crop_fraction, load_image_splits
from .data.streaming import fit_workers_to_shared_memory
from .loading import build_config, load_classifier
from .paths import check_output_folder
from .precision import BF16_AUTO_HELP, decide_bf16
from .results import architecture, encoder_fingerprint, run_record, write_results


@dataclass
class FrozenEvalArguments:
    """Evaluation of a frozen encoder: linear probe and/or kNN on features computed once."""

    output_dir: str = flag(None, "Where results (and the probe model) go. Required.")
    overwrite_output_dir: bool = flag(False, "Replace the results of an earlier evaluation in --output_dir (its result "
                                             "files and saved probes are removed first). Without it such a folder is "
                                             "refused.")
    random_init: bool = flag(False, "Evaluate a randomly initialised encoder of the same config (the baseline row). "
                                    "Also the case when no --model_name_or_path is given.")
    pooling: str = flag("cls", "Features: 'cls' token or 'mean' of patch tokens.")
    linear_probe: bool = flag(True, "Train and evaluate the linear probe.")
    feature_blocks: int = flag(1, "1: the linear probe sees the pooled feature (--pooling). k > 1: class token and "
                                  "mean patch token of each of the last k blocks (each after the encoder's final "
                                  "LayerNorm), concatenated; protocol linear_probe_multiblock. kNN always uses the "
                                  "pooled feature.")
    attentive_probe: bool = flag(False, "Also train the attentive probe (learned-query cross-attention over the cached "
                                        "patch tokens + linear classifier); protocol attentive_probe.")
    attentive_heads: int = flag(4, "Attention heads of the attentive probe.")
    attentive_epochs: int = flag(20, "Epochs of the attentive probe (on cached tokens).")
    attentive_batch_size: int = flag(256, "Batch of the attentive probe.")
    attentive_learning_rate: float = flag(1e-3, "AdamW peak lr of the attentive probe.")
    attentive_weight_decay: float = flag(0.05, "AdamW weight decay (linear weights).")
    token_cache: str = flag("auto", "Where the attentive probe's float16 patch tokens are cached: 'memory', 'disk' (a "
                                    "np.memmap file in --output_dir, deleted afterwards) or 'auto' (GPU memory while "
                                    "they take at most half of it; host memory up to 2 GiB; otherwise disk).")
    knn: bool = flag(True, "Evaluate weighted kNN on the same features.")
    knn_k: list[int] = flag(help="Neighbour counts for kNN; eval_accuracy is the first one's, all are recorded.",
                            default_factory=lambda: [20, 200])
    knn_temperature: float = flag(0.07, "Temperature of the kNN vote weights.")
    probe_epochs: int = flag(90, "Epochs of the probe head (on cached features).")
    probe_batch_size: int = flag(256, "Batch of the probe head.")
    probe_learning_rate: float = flag(0.1, "SGD learning rate of the probe head.")
    probe_weight_decay: float = flag(0.0, "SGD weight decay of the probe head.")
    feature_batch_size: int = flag(512, "Batch of the feature extraction.")
    dataloader_num_workers: int | None = flag(None, "DataLoader workers that decode images read from disk during the "
                                                    "encoder pass (default: this process's share of the CPUs, one left "
                                                    "for it); images held in memory need none.")
    seed: int = flag(42, "Seed of random init and probe training.")
    device: str = flag("auto", "'auto' (cuda if available), 'cpu', 'cuda', ...")
    bf16: bool | None = flag(None, "bf16 autocast for the encoder's features (and linear_probe.py's attentive probe): "
                                   f"{BF16_AUTO_HELP}")
    disable_tqdm: bool = flag(False, "No progress bars (feature extraction, probe epochs), as the Trainer's flag.")

    def __post_init__(self):  # sizes and rates torch would refuse later with a message that names no flag
        for name in ("probe_epochs", "probe_batch_size", "feature_batch_size", "attentive_epochs",
                     "attentive_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("dataloader_num_workers", "probe_learning_rate", "probe_weight_decay", "attentive_learning_rate",
                     "attentive_weight_decay"):
            if (getattr(self, name) or 0) < 0:  # dataloader_num_workers None: the default
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not self.knn_temperature > 0:
            raise ValueError(f"--knn_temperature must be positive, got {self.knn_temperature}.")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a device: 'auto', 'cpu', 'cuda', 'cuda:1', "
                                 "...") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: this machine has no CUDA GPU that torch can use; pass "
                                 "--device cpu (or auto).")


def check_feature_blocks(feature_blocks: int, num_hidden_layers: int) -> None:
    """--feature_blocks against the encoder's depth, as soon as the config is known (a usage error)."""
    if not 1 <= feature_blocks <= num_hidden_layers:
        raise UsageError(f"--feature_blocks {feature_blocks}: the encoder has {num_hidden_layers} layer(s), so it "
                         f"takes 1 to {num_hidden_layers}. Pass --feature_blocks {num_hidden_layers} or less.")


def check_previous_results(args) -> list[str]:
    """Before any work: an --output_dir with result files of an earlier run is refused (new results beside them would
    mix two runs' settings) unless --overwrite_output_dir true. Returns the earlier evaluation's files to remove."""
    folder = args.output_dir
    found = sorted(name for name in os.listdir(folder) if name.endswith("_results.json")) \
        if os.path.isdir(folder) else []
    if not found:
        return []
    others = [name for name in found
              if name not in {f"{protocol.name}_results.json" for protocol in probes.FROZEN_PROTOCOLS}]
    if others:  # another script's run (a fine-tune, a pretraining): never ours to delete
        raise UsageError(f"--output_dir {folder} holds {', '.join(others)} of another kind of run. Give "
                         "the evaluation a folder of its own, e.g. --output_dir <that folder>/probe.")
    if not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {folder} already holds results of an earlier evaluation "
                         f"({', '.join(found)}). Give a new --output_dir, or pass --overwrite_output_dir true to "
                         "replace them (the earlier result files and probes are removed first).")
    # a protocol's files named after it always; a saved model's only beside its result
    names = found + [name for protocol in probes.FROZEN_PROTOCOLS for name in protocol.saves
                     if name.startswith(protocol.name) or f"{protocol.name}_results.json" in found]
    return [path for path in (os.path.join(folder, name) for name in names) if os.path.isfile(path)]


def run_frozen_evaluation(model_args, data_args, args: FrozenEvalArguments) -> dict:
    """The frozen encoder runs once per image, keeping what the wanted protocols need; then each protocol trains on
    that and writes its result file. Returns {protocol: results}."""
    if args.output_dir is None:
        raise UsageError("--output_dir is required.")
    check_output_folder(args.output_dir)  # before any work
    if model_args.model_name_or_path and os.path.realpath(args.output_dir) == os.path.realpath(
            model_args.model_name_or_path):
        raise UsageError("--output_dir is the model folder itself; the probe would overwrite that model. Use a "
                         "subfolder, e.g. --output_dir <model>/probe.")
    wanted = [protocol for protocol in probes.FROZEN_PROTOCOLS if protocol.wanted(args)]
    if not wanted:
        switches = [f"--{switch}" for switch in dict.fromkeys(p.switch for p in probes.FROZEN_PROTOCOLS)]
        raise UsageError(f"Nothing to do: {', '.join(switches[:-1])} and {switches[-1]} are all false.")
    needs = {protocol.needs for protocol in wanted}
    if args.pooling not in ("cls", "mean"):
        raise UsageError(f"--pooling must be 'cls' or 'mean', got {args.pooling!r}.")
    if args.token_cache not in ("auto", "memory", "disk"):
        raise UsageError(f"--token_cache must be 'auto', 'memory' or 'disk', got {args.token_cache!r}.")
    if not args.knn_k or min(args.knn_k) < 1:
        raise UsageError(f"--knn_k takes positive neighbour counts, got {args.knn_k}.")
    random_init = args.random_init or not model_args.model_name_or_path
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16, precision = decide_bf16(args.bf16, device)

    config = build_config(model_args)
    check_feature_blocks(args.feature_blocks, config.num_hidden_layers)

    def check_protocols(train=None):  # with the config, then again with the training split, before decoding
        for protocol in wanted:
            protocol.check(args, config, train)

    check_protocols()
    for path in check_previous_results(args):  # last of the checks: nothing is removed for a command refused
        os.remove(path)
    train, evaluation = load_image_splits(data_args, config.image_size, config.num_channels, require_labels=True,
                                          token=model_args.token, num_workers=args.dataloader_num_workers,
                                          check=lambda train, _: check_protocols(train), progress=not args.disable_tqdm)
    for split in (train, evaluation):  # one pass at a time, each with its workers' batches in shared memory
        if split.num_workers:
            split.num_workers, _ = fit_workers_to_shared_memory(
                split.num_workers, 2, args.feature_batch_size * math.prod(split.canvas),
                chosen=args.dataloader_num_workers is not None)
    model = load_classifier(model_args, random_init, args.seed, train.num_classes, train.class_names,
                            linear_probe=True, pooling=args.pooling,
                            new_head="the probe's head is new and trained here" if args.linear_probe else None
                            ).to(device)

    crop_fraction = eval_crop_fraction(data_args, config.image_size, train)
    plain = BatchTransform.for_model(model.config, eval_crop_fraction=crop_fraction)
    print(f"[plan] frozen encoder on {device}, {precision}: features of {len(train)} training and {len(evaluation)} "
          "evaluation images, once", flush=True)
    caches = {name: probes.token_cache_for(len(split), model.config, device, args.token_cache, args.output_dir, name)
              for name, split in (("train", train), ("eval", evaluation))} if "tokens" in needs else {}
    started = time.perf_counter()
    try:
        pooled, blocks = {}, {}
        for name, split in (("train", train), ("eval", evaluation)):
            pooled[name], blocks[name] = probes.encode_frozen(
                model.mae, split, plain, args.feature_batch_size, bf16, args.feature_blocks if "blocks" in needs
                else 1, caches.get(name), progress=None if args.disable_tqdm else f"Features ({name})")
        feature_seconds = round(time.perf_counter() - started, 2)
        inputs = probes.FrozenInputs(model, train, evaluation, pooled, blocks, caches, device, bf16,
                                     encoder_fingerprint(model.mae))
        common = {"encoder": "random_init" if random_init else "pretrained",
                  "model_name_or_path": model_args.model_name_or_path or None,
                  "encoder_fingerprint": inputs.encoder_fingerprint, "architecture": architecture(model.config),
                  "feature_seconds": feature_seconds,
                  **run_record(data_args, train, evaluation, device=device, world_size=1, bf16=bf16, seed=args.seed,
                               crop_fraction=crop_fraction)}
        results = {}
        # kNN first: its result is saved before any long probe
        for protocol in sorted(wanted, key=lambda protocol: protocol.name != "knn"):
            results[protocol.name] = {**common, "protocol": protocol.name, **protocol.fit(inputs, args)}
            write_results(args.output_dir, protocol.name, results[protocol.name])
        return results
    finally:  # the token caches hold gigabytes at full scale: free memory, delete memmap files
        for cache in caches.values():
            cache.close()
