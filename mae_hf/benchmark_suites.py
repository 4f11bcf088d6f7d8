"""The benchmark's probe, augment and attention suites and the model suite's profiler tables (scripts/benchmark.py
--suite ..., --profile_steps; described with every flag in mae_hf/benchmark.py, which runs them)."""

import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from .benchmark import alternating, device_seconds, make_optimizer, median_ratio, train_step
from .transfer import synchronize


def probe_suite(args, config, bf16, autocast):
    """Linear probe on features computed once, against re-running the frozen encoder for every head epoch."""
    from .data import BatchTransform
    from .modeling_mae import MAEForImageClassification
    from .probes import encode_frozen, train_probe

    torch.manual_seed(args.seed)
    config.update({"linear_probe": True, "num_labels": 10})
    model = MAEForImageClassification(config).to(args.device)
    images = torch.randint(0, 256, (args.probe_images, config.num_channels, config.image_size, config.image_size),
                           dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.probe_images,)).to(args.device)
    transform = BatchTransform.for_model(config)

    def features():
        return encode_frozen(model.mae, images, transform, batch_size=256, bf16=bf16)[0]

    def cached(epochs):
        train_probe(model, features(), labels, epochs=epochs)

    def rerun(epochs):
        first = features()
        train_probe(model, first, labels, epochs=epochs,
                    feature_sampler=lambda epoch: (first if epoch == 0 else features(), labels))

    results = {}
    for epochs in args.probe_epochs:
        seconds = alternating({"features_once": cached, "encoder_every_epoch": rerun}, args.rounds,
                              lambda run: device_seconds(args.device, run, epochs))
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        results[epochs] = {"seconds": seconds, "median_seconds": medians,
                           "speedup": medians["encoder_every_epoch"] / medians["features_once"]}
    print(f"{args.device}, {'bf16 autocast' if bf16 else 'fp32'}, {args.probe_images} images, {args.rounds} rounds\n")
    print("| head epochs | features once (s) | encoder every epoch (s) | speedup |\n|---:|---:|---:|---:|")
    for epochs, result in results.items():
        medians = result["median_seconds"]
        print(f"| {epochs} | {medians['features_once']:.2f} | {medians['encoder_every_epoch']:.2f} | "
              f"{result['speedup']:.1f}x |")
    return {"probe_images": args.probe_images, "rounds": args.rounds, "results": results}


def augment_suite(args, config, bf16, autocast):
    """The recipe's training augmentation against the fine-tune train step, alternating, per batch."""
    from .augment import soft_target_cross_entropy
    from .cli import parse_args
    from .data import DataArguments
    from .modeling_mae import MAEForImageClassification
    from .training_args import FinetuneArguments, ImageTrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:  # the recipe's arguments want one; nothing is written
        _, recipe = parse_args((DataArguments, FinetuneArguments), [args.recipe, "--output_dir", output_dir])
    num_labels = 10
    torch.manual_seed(args.seed)
    config.update({"num_labels": num_labels, "drop_path_rate": recipe.drop_path_rate, "pooling": recipe.pooling})
    model = MAEForImageClassification(config).to(args.device).train()
    optimizer = make_optimizer(model, args.optimizer)
    images = torch.randint(0, 256, (args.batch_size, config.num_channels, config.image_size, config.image_size),
                           dtype=torch.uint8).to(args.device)
    labels = torch.randint(0, num_labels, (args.batch_size,)).to(args.device)
    strong_transform, _ = recipe.batch_transforms(config)
    mixer = recipe.mixer(num_labels)
    baseline_transform, _ = ImageTrainingArguments.batch_transforms(recipe, config)  # crop + flip alone

    def strong():
        x = strong_transform(images)
        return mixer(x, labels) if mixer is not None else x

    pixel_values, targets = strong() if mixer else (strong(), F.one_hot(labels, num_labels).float())

    def step():
        with autocast:
            logits = model(pixel_values=pixel_values).logits
        soft_target_cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {"strong_augmentation": strong, "crop_flip_only": lambda: baseline_transform(images), "train_step": step}
    for run in parts.values():
        for _ in range(args.warmup):
            run()

    def per_batch(part) -> tuple[float, float]:
        """Wall time and the process's CPU time (on a shared CPU the wall time also holds waiting for cores, which
        hits many small ops harder than a few large ones)."""
        synchronize(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            part()
        synchronize(args.device)
        return (time.perf_counter() - start) / args.steps, (time.process_time() - cpu_start) / args.steps

    measured = alternating(parts, args.rounds, per_batch)  # per batch, one entry per round
    record = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "recipe": args.recipe}
    for index, prefix in enumerate(("", "cpu_")):  # wall time, then CPU time
        times = {name: [round_times[index] for round_times in values] for name, values in measured.items()}
        per_round = {name: [a / b for a, b in zip(values, times["train_step"])]
                     for name, values in times.items() if name != "train_step"}
        record[f"{prefix}seconds_per_batch"] = times
        record[f"median_{prefix}seconds_per_batch"] = {name: statistics.median(v) for name, v in times.items()}
        record[f"{prefix}ratio_to_train_step_per_round"] = per_round
        record[f"{prefix}ratio_to_train_step"] = {name: statistics.median(r) for name, r in per_round.items()}
    seconds, medians, ratios, cpu_medians, cpu_ratios = (record[key] for key in (
        "seconds_per_batch", "median_seconds_per_batch", "ratio_to_train_step", "median_cpu_seconds_per_batch",
        "cpu_ratio_to_train_step"))
    mixing = f"mixup {recipe.mixup_alpha} / cutmix {recipe.cutmix_alpha}" if mixer else "none"
    print(f"{args.device}, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.steps} batches, {torch.get_num_threads()} threads; recipe {args.recipe}: "
          f"{strong_transform.augment!r}, random erasing {recipe.random_erasing}, mixing {mixing}\n")
    print("| per batch | wall ms (median) | min | max | / train step | CPU ms (median) | / train step |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, values in seconds.items():
        ratio = f"{100 * ratios[name]:.1f} %" if name in ratios else ""
        cpu_ratio = f"{100 * cpu_ratios[name]:.1f} %" if name in cpu_ratios else ""
        print(f"| {name} | {1000 * medians[name]:.1f} | {1000 * min(values):.1f} | {1000 * max(values):.1f} | "
              f"{ratio} | {1000 * cpu_medians[name]:.1f} | {cpu_ratio} |")
    print("\n(ratios: medians of the per-round ratios)")
    print(f"strong augmentation / train step: {100 * ratios['strong_augmentation']:.1f} % wall, "
          f"{100 * cpu_ratios['strong_augmentation']:.1f} % CPU time (limit 10 %)")
    return record


def attention_suite(args, config, bf16, autocast):
    """The attention of one block, torch's sdpa kernel against the formula (`eager_attention_forward`: matrix
    products and a softmax), for several token counts: a train step's forward + backward and inference, in fp32 and
    bf16, alternating. The evidence behind `CPU_BF16_FORMULA_MAX_TOKENS` in modeling_mae.py."""
    from .modeling_mae import eager_attention_forward

    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    module = torch.nn.Module().train()

    def formula(q, k, v):
        return eager_attention_forward(module, q, k, v, None, scaling=head_dim ** -0.5)[0]

    def kernel(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def calls(function, qkv, train: bool) -> None:
        for _ in range(args.steps):
            with torch.set_grad_enabled(train):
                batch, length = qkv.shape[:2]
                q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, head_dim).unbind(2))
                output = function(q, k, v)
                if train:
                    output.sum().backward()

    def timed(function, qkv, train: bool) -> float:
        return device_seconds(args.device, calls, function, qkv, train) / args.steps

    rows, functions = [], {"sdpa": kernel, "formula": formula}
    for tokens in args.attention_tokens:
        batch = max(1, args.batch_size * 65 // tokens)  # about the same number of tokens per call
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=dtype, device=args.device, requires_grad=True)
            for train in (True, False):
                for function in functions.values():
                    timed(function, qkv, train)  # warm up
                seconds = alternating(functions, args.rounds, lambda function: timed(function, qkv, train))
                ratio, _ = median_ratio(seconds["sdpa"], seconds["formula"])
                rows.append({"tokens": tokens, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                             "pass": "forward + backward" if train else "inference", "seconds": seconds,
                             "sdpa_over_formula": ratio})
    print(f"{args.device}, {heads} heads of {head_dim}, {args.rounds} rounds x {args.steps} calls, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}\n")
    print("| tokens | batch | dtype | pass | sdpa ms | formula ms | sdpa / formula |\n"
          "|---:|---:|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tokens']} | {row['batch']} | {row['dtype']} | {row['pass']} | "
              f"{1000 * statistics.median(row['seconds']['sdpa']):.1f} | "
              f"{1000 * statistics.median(row['seconds']['formula']):.1f} | {row['sdpa_over_formula']:.2f} |")
    print("\n(sdpa / formula > 1: the formula is faster; medians of the per-round ratios)")
    return {"heads": heads, "head_dim": head_dim, "rows": rows}


def print_profiles(runs: dict, pixel_values, steps: int, mode: str, top: int = 25) -> None:
    """torch.profiler over `steps` train steps of each model (alternating): per operator, the smallest self CPU time
    of one step (the least disturbed by other load) and its calls, the models side by side."""
    from torch.profiler import ProfilerActivity, profile

    def profiled(run) -> dict:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            train_step(run["stepper"], run["optimizer"], pixel_values, run["autocast"])
        return {event.key: (event.self_cpu_time_total / 1e3, event.count) for event in profiler.key_averages()}

    tables = {name: {key: min(step[key] for step in per_step if key in step) for key in set().union(*per_step)}
              for name, per_step in alternating(runs, steps, profiled).items()}
    names = list(runs)
    keys = sorted(set().union(*tables.values()), key=lambda key: -max(table.get(key, (0, 0))[0]
                                                                     for table in tables.values()))
    print(f"\nprofile, {mode}, {torch.get_num_threads()} threads: self CPU ms per step (min over {steps}) and calls\n")
    print("| operator | " + " | ".join(f"{name} ms | calls" for name in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    print("| (sum of all) | " + " | ".join(f"{sum(v[0] for v in tables[name].values()):.1f} | " for name in names)
          + " |")
    for key in keys[:top]:
        print(f"| {key} | " + " | ".join("{:.1f} | {}".format(*tables[name].get(key, (0.0, 0))) for name in names)
              + " |")
    print()
