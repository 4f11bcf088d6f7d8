r"""Speed and memory benchmarks: mae_hf against transformers' ViTMAE, the pipeline, the probe, the augmentation.

    python scripts/benchmark.py --device cpu --warmup 2 --steps 2 --rounds 12

The default suite (model): train-step throughput and memory of `mae_hf.MAEForPreTraining` against transformers'
`ViTMAEForPreTraining`. Both models get the same config, the same weights (ours is built from a seed and converted
with `to_vit_mae`) and the same fixed batch of random-normal pixels. A train step is forward (random masking),
backward, AdamW step, zero_grad. The models are timed round-robin in one process (a chunk of ours, a chunk of theirs,
for `--rounds` rounds, who goes first alternating) and the median over rounds is reported, so machine noise hits both
alike; the JSON also holds the per-round ratios.

Memory columns:
  train_state_mb  parameters, buffers, gradients and AdamW state, plus the unique storages of the tensors autograd
                  saves for backward during one eager forward (`torch.autograd.graph.saved_tensors_hooks`; parameters
                  and buffers are not counted twice). A lower bound of the peak: transient buffers and allocator
                  caching are left out. Measured on every device (an RSS high-water mark would be process-wide and
                  monotonic, so it cannot separate the two models).
  cuda_peak_mb    (CUDA only) the model's parameters, buffers and optimizer state plus the rise of
                  `torch.cuda.max_memory_allocated` over one timed chunk (peak stats reset before each chunk).

    python scripts/benchmark.py                                      # MAEConfig() defaults, batch 64, CUDA if present
    python scripts/benchmark.py --device cpu --threads 2 --warmup 2 --steps 3 --rounds 5
    python scripts/benchmark.py --config_overrides "hidden_size=128,num_attention_heads=4,num_hidden_layers=4" --compile

--modes times both models in several modes in one run (every model and mode in turn in each round), with the CPU
time per image, the percent of the GEMM limit (fp32 and bf16 matrix-product FLOP/s measured at the step's largest
shapes in each round, against the step's FLOPs counted by torch.utils.flop_counter), the compile time and the steps
after which compiling has paid; --profile_steps adds torch.profiler tables of both models side by side:

    python scripts/benchmark.py --device cpu --modes fp32 bf16 bf16+compile --warmup 2 --steps 2 --rounds 8

More suites, same flags:
  --suite pipeline  the whole pretraining pipeline (MAEPretrainer: uint8 batches gathered from a tensor, crop/flip/
                    normalise on the device, train step, grad clipping, schedule) against the model-only train step,
                    alternating; the pipeline must keep >= 90 % of the model-only images/s.
  --suite probe     linear probe wall time with features computed once (mae_hf) against re-running the frozen encoder
                    for every head epoch (the reference's approach), at the same epochs (--probe_epochs).
  --suite attention one block's attention, torch's sdpa kernel against the formula's matrix products, fp32 and bf16,
                    train (forward + backward) and inference, for --attention_tokens token counts: the evidence for
                    CPU_BF16_FORMULA_MAX_TOKENS (modeling_mae.py).
  --suite augment   the fine-tuning recipe's training augmentation (--recipe: crop/flip, RandAugment, normalise,
                    random erasing, mixup/cutmix) against the fine-tune train step of MAEForImageClassification
                    (forward, soft-target loss, backward, AdamW), alternating; today's crop + flip for reference.
                    The strong augmentation must cost <= 10 % of the step.
  --suite data      images per DataLoader-worker CPU-second from a prepared folder against run_mae.py's per-image
                    transform on the same bytes, and peak memory (PSS, main + workers) per data size
                    (--data_sizes); --suite listing: an os.scandir listing of --listing_files files against datasets'
                    imagefolder; --suite memory: peak RSS of decoding --memory_sizes JPEGs into memory.
                    (mae_hf/benchmark_data.py)

    python scripts/benchmark.py --suite pipeline --batch_size 512          # on a GPU: bf16 + torch.compile
    python scripts/benchmark.py --suite probe --device cpu --probe_images 1024 --probe_epochs 10 20
    python scripts/benchmark.py --suite augment --recipe configs/cpu_small_finetune_strong.yaml --batch_size 128 \
        --config_overrides "patch_size=4,hidden_size=128,num_hidden_layers=4,num_attention_heads=4"
"""

import argparse
import collections
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import transformers

from .cli import keep_freed_memory_requested
from .configuration_mae import MAEConfig
from .convert import to_vit_mae
from .inputs import write_json
from .loading import ModelArguments, build_config
from .modeling_mae import MAEForPreTraining
from .precision import BF16_AUTO_HELP, autocast_for, decide_bf16, native_bf16, warn_if_emulated
from .redaction import recorded_command
from .transfer import synchronize

MB = 2**20
# suite -> the module of its `<suite>_suite` (the probe, augment and attention suites use this module's timers)
SUITES = {"model": "benchmark", "pipeline": "benchmark", "probe": "benchmark_suites", "augment": "benchmark_suites",
          "attention": "benchmark_suites", "data": "benchmark_data", "listing": "benchmark_data",
          "memory": "benchmark_data"}


def build_models(config: MAEConfig, seed: int, device: str, baseline_dir: str | None = None) -> dict:
    """mae_hf and ViTMAE with identical weights (so both compute the same function); with `baseline_dir`, also the
    mae_hf of that checkout ("baseline"), with the same weights: its mae_hf/modeling_mae.py imported beside this one
    as `mae_hf_baseline.modeling_mae`, without that package's `__init__` (which would register its classes with the
    Auto classes in place of ours)."""
    torch.manual_seed(seed)
    ours = MAEForPreTraining(config)
    models = {"mae_hf": ours, "ViTMAE": to_vit_mae(ours)}
    if baseline_dir is not None:
        package = os.path.join(baseline_dir, "mae_hf")
        if not os.path.isfile(os.path.join(package, "modeling_mae.py")):
            raise ValueError(f"--baseline_dir {baseline_dir}: no mae_hf/modeling_mae.py there; extract a checkout "
                             f"first, e.g. git archive <commit> | tar -x -C {baseline_dir}")
        module = types.ModuleType("mae_hf_baseline")
        module.__path__ = [package]
        sys.modules.setdefault("mae_hf_baseline", module)
        baseline = importlib.import_module("mae_hf_baseline.modeling_mae")
        models["baseline"] = baseline.MAEForPreTraining(baseline.MAEConfig.from_dict(config.to_dict()))
        models["baseline"].load_state_dict(ours.state_dict())
    return {name: model.to(device).train() for name, model in models.items()}


def train_step(model, optimizer, pixel_values, autocast, steps: int = 1):
    for _ in range(steps):
        with autocast:
            loss = model(pixel_values=pixel_values).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_bytes(model, optimizer) -> int:
    """Parameters (frozen ones included), buffers and AdamW state."""
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes(state)


def train_state_bytes(model, optimizer, pixel_values, autocast) -> int:
    """Resident bytes + gradients + unique storages saved for backward during one eager forward."""
    param_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(pixel_values=pixel_values)  # its graph, and what the graph saved, freed at once
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return resident_bytes(model, optimizer) + grads + sum(saved.values())


def device_seconds(device, function, *args) -> float:
    """Wall seconds of `function(*args)`, the device's queue drained before and after: CUDA runs asynchronously, and
    without that the clock would stop when the work is queued, not done."""
    synchronize(device)
    start = time.perf_counter()
    function(*args)
    synchronize(device)
    return time.perf_counter() - start


def timed_chunk(model, optimizer, pixel_values, autocast, steps: int, device: str):
    """Seconds for `steps` train steps, and the CUDA peak rise over the chunk (None on other devices)."""
    cuda = device.startswith("cuda")
    if cuda:  # the allocator's counters are kept on the host: no need to wait for the device
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = device_seconds(device, train_step, model, optimizer, pixel_values, autocast, steps)
    return seconds, (torch.cuda.max_memory_allocated() - base if cuda else None)


def alternating(runs: dict, rounds: int, measure) -> dict:
    """`{name: [measure(run), one per round]}` for `runs` ({name: run}), who goes first alternating between rounds, so
    that machine noise hits every run alike."""
    measured = {name: [] for name in runs}
    for round_index in range(rounds):
        for name in list(runs) if round_index % 2 == 0 else list(runs)[::-1]:
            measured[name].append(measure(runs[name]))
    return measured


def median_ratio(values, reference) -> tuple[float, list[float]]:
    """The median of the per-round ratios `values / reference` (robust while the load hits both alike), and those."""
    ratios = [a / b for a, b in zip(values, reference)]
    return statistics.median(ratios), ratios


MODES = {"fp32": (False, False), "bf16": (True, False), "fp32+compile": (False, True), "bf16+compile": (True, True)}


def make_optimizer(model, kind: str):
    """AdamW as the Trainer builds it (`adamw_torch_fused`, its default), or the foreach / for-loop variants."""
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kind]
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **options)


def step_flops(model, pixel_values) -> float:
    """Floating-point operations of one forward + backward (matrix products: linear layers and attention), counted
    by `torch.utils.flop_counter` with sdpa's math backend (so that attention is counted as the products it is)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        model(pixel_values=pixel_values).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_shapes(config: MAEConfig, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the largest matrix products of a train step: the encoder's and the decoder's MLP inputs."""
    kept = 1 + config.num_visible_patches
    return [(batch * kept, config.hidden_size, config.intermediate_size),
            (batch * (1 + config.num_patches), config.decoder_hidden_size, config.decoder_intermediate_size)]


def gemm_rate(shapes, dtype, device: str, seconds: float = 0.3) -> float:
    """Matrix-product FLOP/s at the step's own largest shapes (the best of them): the GEMM limit of this machine."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b  # warm up
        synchronize(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(shapes):
            a @ b
            count += 1
        synchronize(device)
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best


def model_suite(args, config, bf16, autocast):
    """mae_hf against transformers' ViTMAE in each of `--modes` (precision, torch.compile): train-step images/s,
    CPU time, percent of the GEMM limit and memory, every (model, mode) in turn in each round."""
    modes = list(dict.fromkeys(args.modes or [("bf16" if bf16 else "fp32") + ("+compile" if args.compile else "")]))
    load_before = os.getloadavg()
    base = build_models(config, args.seed, args.device, args.baseline_dir)
    pixel_values = torch.randn(args.batch_size, config.num_channels, config.image_size, config.image_size,
                               generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    flops = {name: step_flops(model, pixel_values) / args.batch_size for name, model in base.items()}
    shapes = gemm_shapes(config, args.batch_size)
    runs = {}  # (model, mode) -> what a run needs and what it measured
    for mode in modes:
        mode_bf16, compiled = MODES[mode]
        for name, model in base.items():
            model = copy.deepcopy(model)
            optimizer = make_optimizer(model, args.optimizer)
            context = autocast_for(args.device, mode_bf16)
            train_step(model, optimizer, pixel_values, context)  # creates the AdamW state
            runs[name, mode] = {
                "model": model, "optimizer": optimizer, "autocast": context,
                "stepper": torch.compile(model) if compiled else model,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "train_state_mb": train_state_bytes(model, optimizer, pixel_values, context) / MB,
                "images_per_s_rounds": [], "cpu_ms_per_image_rounds": [], "cuda_peak_mb": None}
    for run in runs.values():  # the first call of a compiled model compiles it
        run["first_step_seconds"] = device_seconds(args.device, train_step, run["stepper"], run["optimizer"],
                                                   pixel_values, run["autocast"])
        train_step(run["stepper"], run["optimizer"], pixel_values, run["autocast"], steps=args.warmup)

    gemm = {"fp32": [], "bf16": []}
    keys = list(runs)
    for round_index in range(args.rounds):
        shift = round_index % len(keys)  # rotate who goes first
        for key in keys[shift:] + keys[:shift]:
            run, cpu_start = runs[key], time.process_time()
            seconds, peak_rise = timed_chunk(run["stepper"], run["optimizer"], pixel_values, run["autocast"],
                                             args.steps, args.device)
            images = args.batch_size * args.steps
            run["cpu_ms_per_image_rounds"].append(1000 * (time.process_time() - cpu_start) / images)
            run["images_per_s_rounds"].append(images / seconds)
            if peak_rise is not None:
                peak = (resident_bytes(run["model"], run["optimizer"]) + peak_rise) / MB
                run["cuda_peak_mb"] = max(run["cuda_peak_mb"] or 0.0, peak)
        if args.gemm:
            for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                gemm[precision].append(gemm_rate(shapes, dtype, args.device))
    load_after = os.getloadavg()
    if args.profile_steps:
        from .benchmark_suites import print_profiles

        for mode in modes:
            print_profiles({name: runs[name, mode] for name in base}, pixel_values, args.profile_steps, mode)

    results = {}
    for (name, mode), run in runs.items():
        rounds = run["images_per_s_rounds"]
        step_seconds = args.batch_size / statistics.median(rounds)
        result = {key: run[key] for key in ("trainable_parameters", "train_state_mb", "images_per_s_rounds",
                                            "cpu_ms_per_image_rounds", "cuda_peak_mb", "first_step_seconds")}
        result.update(model=name, mode=mode, images_per_s=statistics.median(rounds),
                      cpu_ms_per_image=statistics.median(run["cpu_ms_per_image_rounds"]),
                      train_gflop_per_image=flops[name] / 1e9)
        for key, reference in (("vit_mae", ("ViTMAE", mode)), ("mae_hf_first_mode", ("mae_hf", modes[0])),
                               ("baseline_first_mode", ("baseline", modes[0]))):
            if reference in runs:
                reference_rounds = runs[reference]["images_per_s_rounds"]
                result[f"over_{key}"], result[f"over_{key}_per_round"] = median_ratio(rounds, reference_rounds)
                result[f"best_over_{key}"] = max(rounds) / max(reference_rounds)
        if gemm["fp32"]:
            rates = gemm["bf16" if MODES[mode][0] else "fp32"]
            result["percent_of_gemm_limit"] = statistics.median(
                100 * images * flops[name] / rate for images, rate in zip(rounds, rates))
        if MODES[mode][1]:  # compile time, and after how many steps it has paid for itself
            eager = runs.get((name, mode.removesuffix("+compile")))
            result["compile_seconds"] = run["first_step_seconds"] - step_seconds
            if eager is not None:
                saved = args.batch_size / statistics.median(eager["images_per_s_rounds"]) - step_seconds
                result["break_even_steps"] = result["compile_seconds"] / saved if saved > 0 else None
        results[f"{name} {mode}"] = result

    limits = {}
    if gemm["fp32"]:
        gflop = flops["mae_hf"] / 1e9
        limits = {precision: statistics.median(rates) / flops["mae_hf"] for precision, rates in gemm.items()}
        rates = {precision: statistics.median(values) / 1e9 for precision, values in gemm.items()}
        print(f"matrix products at the step's largest shapes {shapes}: fp32 {rates['fp32']:,.0f} GFLOP/s, bf16 "
              f"{rates['bf16']:,.0f} GFLOP/s (medians over rounds); a train step is {gflop:.2f} GFLOP per image, so "
              f"the GEMM limit is {limits['fp32']:,.1f} images/s in fp32, {limits['bf16']:,.1f} in bf16\n")
    print(f"{args.device} (native bf16: {native_bf16(args.device) or 'none'}), batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads, AdamW {args.optimizer}; load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min; {os.cpu_count()} CPUs)\n")
    memory_columns = ["train_state_mb"] + (["cuda_peak_mb"] if any(r["cuda_peak_mb"] for r in results.values()) else [])
    baseline = "baseline" in base
    print("| model | mode | images/s (median) | min | max | CPU ms/image | / ViTMAE | / mae_hf " + modes[0] + " | "
          + (f"/ baseline {modes[0]} | " if baseline else "") + "% of GEMM limit | compile s | pays after (steps) | "
          + " | ".join(memory_columns) + " |")
    print("|---|---|" + "---:|" * (9 + baseline + len(memory_columns)))
    for result in results.values():
        rounds = result["images_per_s_rounds"]
        percent = result.get("percent_of_gemm_limit")
        compile_seconds = result.get("compile_seconds")
        pays = ("" if "break_even_steps" not in result  # compiled modes with an eager run to compare with
                else "never" if result["break_even_steps"] is None else f"{result['break_even_steps']:,.0f}")
        print(f"| {result['model']} | {result['mode']} | {result['images_per_s']:.1f} | {min(rounds):.1f} | "
              f"{max(rounds):.1f} | {result['cpu_ms_per_image']:.1f} | {result['over_vit_mae']:.2f} | "
              f"{result['over_mae_hf_first_mode']:.2f} | "
              + (f"{result['over_baseline_first_mode']:.2f} | " if baseline else "")
              + f"{'' if percent is None else f'{percent:.0f} %'} | "
              f"{'' if compile_seconds is None else f'{compile_seconds:.0f}'} | {pays} | "
              + " | ".join(f"{result[key]:.1f}" for key in memory_columns) + " |")
    print("\n(ratios and percentages: medians of the per-round values, noise-robust while the load hits every model "
          "alike; on a CPU shared with bursty jobs the best round of each is the least disturbed measurement)")
    for mode in modes:
        print(f"mae_hf / ViTMAE, {mode}: {results[f'mae_hf {mode}']['over_vit_mae']:.2f} (best rounds: "
              f"{results[f'mae_hf {mode}']['best_over_vit_mae']:.2f})")
    reference = "baseline" if baseline else "mae_hf"
    for mode in modes[1:] if reference == "mae_hf" else modes:
        result = results[f"mae_hf {mode}"]
        print(f"mae_hf {mode} / {reference} {modes[0]}: {result[f'over_{reference}_first_mode']:.2f} (best rounds: "
              f"{result[f'best_over_{reference}_first_mode']:.2f})")
    return {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "modes": modes, "optimizer": args.optimizer, "native_bf16": native_bf16(args.device),
            "load_average_before": load_before, "load_average_after": load_after, "gemm_shapes": shapes,
            "gemm_flops_per_s_rounds": gemm, "gemm_limit_images_per_s": limits, "results": results,
            "memory_notes": {"train_state_mb": "parameters, buffers + gradients + AdamW state + unique storages saved "
                             "for backward in one eager forward (those not counted twice); lower bound of the peak",
                             "cuda_peak_mb": "parameters, buffers + AdamW state + rise of "
                             "torch.cuda.max_memory_allocated over one timed chunk; max over rounds (CUDA only)"}}


def pipeline_suite(args, config, bf16, autocast):
    """Whole pretraining pipeline (the Trainer run by scripts/pretrain.py) against the model-only step: on random
    uint8 images held in memory, or (--pipeline_prepared N) on a prepared folder of N synthetic JPEGs read from
    disk by --data_workers DataLoader workers."""
    import tempfile

    from .data import BatchTransform, DataArguments, ImageDataset, collate, load_image_splits
    from .data.memory import InMemoryImages
    from .training import MAEPretrainer, ThroughputCallback
    from .training_args import PretrainingArguments

    torch.manual_seed(args.seed)
    if args.pipeline_prepared:
        from .benchmark_data import prepared_folder

        folder = prepared_folder(args.data_dir or tempfile.mkdtemp(prefix="mae_hf_pipeline_"), args.pipeline_prepared)
        stored = DataArguments(dataset_name=folder, data_in_memory="false", validation_split_percentage=1)
        data, _ = load_image_splits(stored, config.image_size, num_workers=args.data_workers)
    else:
        images = torch.randint(0, 256, (args.pipeline_images, config.num_channels, config.image_size,
                                        config.image_size), dtype=torch.uint8)
        data = InMemoryImages(images, torch.full((len(images), 2), config.image_size, dtype=torch.int32))
    model = MAEForPreTraining(config).to(args.device).train()
    stepper = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model, args.optimizer)
    pixel_values = BatchTransform.for_model(config)(*data.read(range(args.batch_size))).to(args.device)
    train_step(stepper, optimizer, pixel_values, autocast, steps=args.warmup)
    rounds = {"model_only": [], "pipeline": []}

    def pipeline_run(output_dir: str, steps: int, seed: int, callbacks: list) -> PretrainingArguments:
        nonlocal data
        # The workers are a wish (lowered to fit /dev/shm, with a warning), sized by the one loader this run makes.
        training = PretrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=steps,
            eval_strategy="no", save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=bf16,
            torch_compile=args.compile, use_cpu=args.device == "cpu", seed=seed, knn_eval=False)
        training.configure_loaders(data, None)
        train_transform, eval_transform = training.batch_transforms(config)
        if training.place_data_on_device(data):
            data = InMemoryImages(data.images, data.sizes).to(training.device)
        MAEPretrainer(model=model, args=training, train_dataset=ImageDataset(data), data_collator=collate,
                      train_transform=train_transform, eval_transform=eval_transform, callbacks=callbacks).train()
        return training

    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(args.rounds):
            seconds, _ = timed_chunk(stepper, optimizer, pixel_values, autocast, args.steps, args.device)
            rounds["model_only"].append(args.batch_size * args.steps / seconds)
            callback = ThroughputCallback(args.batch_size, measure_seconds=float("inf"))  # steps 3.. are timed
            training = pipeline_run(output_dir, args.steps + 2, args.seed + round_index, [callback])
            rounds["pipeline"].append(callback.images_per_second)
        sync_debug = None
        if args.sync_debug_steps:
            window = SyncDebugWindow(first_step=3, steps=args.sync_debug_steps, device=args.device)
            with window.recording():  # one step after the window: the end of training syncs, and may
                pipeline_run(output_dir, 2 + args.sync_debug_steps + 1, args.seed + args.rounds, [window])
            sync_debug = window.record()
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    ratio = medians["pipeline"] / medians["model_only"]
    workers = training.dataloader_num_workers
    print(f"{args.device}, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.steps} steps, compile={args.compile}, {workers} DataLoader worker(s)\n")
    print("| | images/s (median) | min | max |\n|---|---:|---:|---:|")
    for name, values in rounds.items():
        print(f"| {name} | {medians[name]:,.0f} | {min(values):,.0f} | {max(values):,.0f} |")
    print(f"\npipeline / model-only images/s: {ratio:.3f}")
    if sync_debug is not None:
        print(f"synchronizing CUDA operations over {sync_debug['steps']} pipeline steps: "
              + ("not measurable here (CUDA only)" if sync_debug["warnings"] is None
                 else f"{sync_debug['warnings']} (torch.cuda.set_sync_debug_mode('warn'))"))
        for place, count in sync_debug["places"].items():
            print(f"    {count} x {place}")
    return {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "images_per_s": rounds,
            "median_images_per_s": medians, "ratio_pipeline_over_model_only": ratio,
            "data_workers_asked": args.data_workers if args.pipeline_prepared else 0, "data_workers": workers,
            "sync_debug": sync_debug}


class SyncDebugWindow(transformers.TrainerCallback):
    """Counts the operations that make the host wait for the GPU over `steps` training steps from `first_step` (the
    steps before warm up and compile): `torch.cuda.set_sync_debug_mode("warn")` turns each into a warning, recorded
    here with the Python line that caused it. CUDA only: elsewhere the record says so (None), not zero."""

    def __init__(self, first_step: int, steps: int, device: str):
        self.first_step, self.steps = first_step, steps
        self.cuda = torch.device(device).type == "cuda"
        self.warnings = []
        self.active = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda and state.global_step + 1 == self.first_step:
            torch.cuda.synchronize()  # what came before the window stays out of it
            self.active = True
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self.active and state.global_step == self.first_step + self.steps - 1:
            torch.cuda.set_sync_debug_mode(0)
            self.active = False

    @contextlib.contextmanager
    def recording(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                if self.active:  # training stopped inside the window
                    torch.cuda.set_sync_debug_mode(0)
                    self.active = False
                self.warnings = [w for w in caught if "synchroniz" in str(w.message)]

    def record(self) -> dict:
        places = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in self.warnings)
        return {"steps": self.steps, "first_step": self.first_step, "mode": "warn",
                "warnings": len(self.warnings) if self.cuda else None, "places": dict(places.most_common())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--suite SUITE] [--flag value ...]   (--help lists every flag)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="Train steps per timed chunk.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed train steps per model before the rounds.")
    parser.add_argument("--rounds", type=int, default=5, help="Round-robin rounds; the median over rounds is reported.")
    parser.add_argument("--config_overrides", help='MAEConfig fields, e.g. "hidden_size=128,num_attention_heads=4".')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help=f"Autocast to bfloat16: {BF16_AUTO_HELP}")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--modes", nargs="+", metavar="MODE",
                        help=f"Model suite: time every model in each of these modes, in turn in each round "
                             f"({', '.join(MODES)}); overrides --bf16/--compile.")
    parser.add_argument("--optimizer", choices=("fused", "foreach", "for_loop"), default="fused",
                        help="AdamW implementation (default fused: the Trainer's adamw_torch_fused).")
    parser.add_argument("--gemm", action=argparse.BooleanOptionalAction, default=True, help="Model suite: measure "
                        "fp32 and bf16 matrix-product FLOP/s in each round (the GEMM limit).")
    parser.add_argument("--profile_steps", type=int, default=0, help="Model suite: afterwards, profile this many "
                        "steps of each model in each mode (torch.profiler) and print the operators side by side.")
    parser.add_argument("--baseline_dir",
                        help="Model suite: also time the mae_hf of this checkout (a folder holding its mae_hf/, e.g. "
                             "from `git archive <commit> | tar -x -C DIR`), as the model 'baseline'.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", help="Also write the figures to this JSON file.")
    parser.add_argument("--suite", choices=list(SUITES), default="model",
                        help="model: ours vs ViTMAE (default); pipeline: whole pipeline vs model step; probe, augment, "
                             "attention, data, listing, memory: see above.")
    parser.add_argument("--attention_tokens", type=int, nargs="+", default=[17, 65, 257, 577, 769, 1025],
                        help="Token counts (attention suite).")
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "configs/finetune_strong.yaml"),
                        help="Fine-tuning config file whose augmentation the augment suite times.")
    parser.add_argument("--pipeline_images", type=int, default=4096, help="Synthetic uint8 images (pipeline suite).")
    parser.add_argument("--sync_debug_steps", type=int, default=0,
                        help="Pipeline suite, CUDA: afterwards, count the host-device synchronisations over this many "
                             "pipeline steps (torch.cuda.set_sync_debug_mode('warn')); recorded as sync_debug.")
    parser.add_argument("--pipeline_prepared", type=int, default=0, help="Pipeline suite on a prepared folder of "
                        "this many synthetic JPEGs read from disk by --data_workers workers (0: random images in "
                        "memory).")
    parser.add_argument("--config_name", help="A model config file (e.g. configs/models/mae_vit_base_patch16.json), "
                                              "before --config_overrides.")
    parser.add_argument("--probe_images", type=int, default=1024, help="Synthetic images (probe suite).")
    parser.add_argument("--probe_epochs", type=int, nargs="+", default=[10, 20], help="Head epochs (probe suite).")
    parser.add_argument("--data_sizes", type=int, nargs="+", default=[2000, 8000],
                        help="Images of the prepared folders compared (data suite).")
    parser.add_argument("--data_workers", type=int, default=2,
                        help="DataLoader workers (data suite; pipeline suite with --pipeline_prepared, lowered with a "
                             "warning where /dev/shm cannot hold their batches).")
    parser.add_argument("--data_image_size", type=int, default=224, help="Model input size (data, memory suites).")
    parser.add_argument("--data_dir", help="Where the synthetic images and folders go (reused; default: a temp dir).")
    parser.add_argument("--listing_files", type=int, default=200_000, help="Empty image files listed (listing).")
    parser.add_argument("--memory_sizes", type=int, nargs="+", default=[100, 5000],
                        help="Images decoded into memory (memory suite).")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1 or min(args.warmup, args.profile_steps,
                                                                   args.sync_debug_steps) < 0:
        parser.error("--batch_size, --steps and --rounds must be positive, --warmup, --profile_steps and "
                     "--sync_debug_steps non-negative.")
    unknown_modes = sorted(set(args.modes or ()) - set(MODES))
    if unknown_modes:
        parser.error(f"--modes: unknown mode(s) {unknown_modes}; choose from {', '.join(MODES)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modes:  # each mode names its precision; --bf16/--compile do not apply
        bf16 = False
        emulated = [mode for mode in args.modes if MODES[mode][0]]
        if emulated:
            warn_if_emulated(f"--modes {' '.join(emulated)}", args.device)
    else:
        bf16, _ = decide_bf16(args.bf16, args.device, switch=True)
    autocast = autocast_for(args.device, bf16)

    config = build_config(ModelArguments(config_name=args.config_name, config_overrides=args.config_overrides))
    suite = getattr(importlib.import_module(f".{SUITES[args.suite]}", __package__), f"{args.suite}_suite")
    record = suite(args) if SUITES[args.suite] == "benchmark_data" else suite(args, config, bf16, autocast)
    record.update(command=recorded_command(), suite=args.suite, device=args.device,
                  # with --modes, each mode names its precision and compilation (no single one for the run)
                  dtype=None if args.modes else "bf16 autocast" if bf16 else "fp32",
                  compile=None if args.modes else args.compile, modes=args.modes, threads=torch.get_num_threads(),
                  keep_freed_memory=keep_freed_memory_requested(),
                  torch=torch.__version__, transformers=transformers.__version__, config=config.to_dict())
    if args.output_json:
        write_json(args.output_json, record)

