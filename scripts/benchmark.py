"""Train-step throughput and memory of `mae_hf.MAEForPreTraining` against transformers' `ViTMAEForPreTraining`.

Both models get the same config, the same weights (ours is built from a seed and converted with `to_vit_mae`) and the
same fixed batch of random-normal pixels. A train step is forward (random masking), backward, AdamW step, zero_grad.
The models are timed round-robin in one process (a chunk of ours, a chunk of theirs, for `--rounds` rounds, who goes
first alternating) and the median over rounds is reported, so machine noise hits both alike; the JSON also holds the
per-round ratios.

Memory columns:
  train_state_mb  parameters, buffers, gradients and AdamW state, plus the unique storages of the tensors autograd
                  saves for backward during one eager forward (`torch.autograd.graph.saved_tensors_hooks`; parameters
                  and buffers are not counted twice). A lower bound of the peak: transient buffers and allocator
                  caching are left out. Measured on every device (on CPU, RSS high-water marks are process-wide).
  cuda_peak_mb    (CUDA only) the model's parameters, buffers and optimizer state plus the rise of
                  `torch.cuda.max_memory_allocated` over one timed chunk (peak stats reset before each chunk).

    python scripts/benchmark.py                                      # MAEConfig() defaults, batch 64, CUDA if present
    python scripts/benchmark.py --device cpu --threads 2 --warmup 2 --steps 3 --rounds 5
    python scripts/benchmark.py --config_overrides "hidden_size=128,num_hidden_layers=4" --compile
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import transformers

from mae_hf import MAEConfig, MAEForPreTraining
from mae_hf.cli import parse_overrides
from mae_hf.convert import to_vit_mae

MB = 2**20


def build_models(config: MAEConfig, seed: int, device: str) -> dict:
    torch.manual_seed(seed)
    ours = MAEForPreTraining(config)
    theirs = to_vit_mae(ours)  # identical weights, so both compute the same function
    return {"mae_hf": ours.to(device).train(), "ViTMAE": theirs.to(device).train()}


def train_step(model, optimizer, pixel_values, autocast):
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
        loss = model(pixel_values=pixel_values).loss
    del loss
    grads = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return resident_bytes(model, optimizer) + grads + sum(saved.values())


def timed_chunk(model, optimizer, pixel_values, autocast, steps: int, device: str):
    """Seconds for `steps` train steps, and the CUDA peak rise over the chunk (None on other devices)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, pixel_values, autocast)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - base if cuda else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="Train steps per timed chunk.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed train steps per model before the rounds.")
    parser.add_argument("--rounds", type=int, default=5, help="Round-robin rounds; the median over rounds is reported.")
    parser.add_argument("--config_overrides", help='MAEConfig fields, e.g. "hidden_size=128,num_hidden_layers=4".')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="Autocast to bfloat16 (default: on for CUDA, off otherwise).")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default="benchmark.json")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch_size, --steps and --rounds must be positive, --warmup non-negative.")
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()

    config = MAEConfig()
    overrides = parse_overrides(args.config_overrides)
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        parser.error(f"--config_overrides: unknown field(s) {unknown}.")
    config.update(overrides)
    config.check()

    models = build_models(config, args.seed, args.device)
    pixel_values = torch.randn(args.batch_size, config.num_channels, config.image_size, config.image_size,
                               generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    optimizers, results = {}, {}
    for name, model in models.items():
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        train_step(model, optimizers[name], pixel_values, autocast)  # creates the AdamW state
        results[name] = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "train_state_mb": train_state_bytes(model, optimizers[name], pixel_values, autocast) / MB,
                         "images_per_s_rounds": [], "cuda_peak_mb": None}
    steppers = {name: torch.compile(model) if args.compile else model for name, model in models.items()}
    for name, stepper in steppers.items():
        for _ in range(args.warmup):
            train_step(stepper, optimizers[name], pixel_values, autocast)

    for round_index in range(args.rounds):
        order = list(steppers) if round_index % 2 == 0 else list(steppers)[::-1]  # alternate who goes first
        for name in order:
            seconds, peak_rise = timed_chunk(steppers[name], optimizers[name], pixel_values, autocast, args.steps, args.device)
            results[name]["images_per_s_rounds"].append(args.batch_size * args.steps / seconds)
            if peak_rise is not None:
                peak = (resident_bytes(models[name], optimizers[name]) + peak_rise) / MB
                results[name]["cuda_peak_mb"] = max(results[name]["cuda_peak_mb"] or 0.0, peak)
    for result in results.values():
        result["images_per_s"] = statistics.median(result["images_per_s_rounds"])

    ours, theirs = results["mae_hf"], results["ViTMAE"]
    memory_columns = ["train_state_mb"] + (["cuda_peak_mb"] if ours["cuda_peak_mb"] is not None else [])
    ratios = {key: ours[key] / theirs[key] for key in ["images_per_s"] + memory_columns}
    paired = [a / b for a, b in zip(ours["images_per_s_rounds"], theirs["images_per_s_rounds"])]
    ratios["images_per_s_per_round"], ratios["images_per_s_per_round_median"] = paired, statistics.median(paired)
    print(f"{args.device}, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads, compile={args.compile}\n")
    print("| model | trainable parameters | images/s (median) | min | max | " + " | ".join(memory_columns) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(memory_columns))
    for name, result in results.items():
        rounds = result["images_per_s_rounds"]
        print(f"| {name} | {result['trainable_parameters']:,} | {result['images_per_s']:.1f} | {min(rounds):.1f} | "
              f"{max(rounds):.1f} | " + " | ".join(f"{result[key]:.1f}" for key in memory_columns) + " |")
    print("| ratio mae_hf / ViTMAE | | " + f"{ratios['images_per_s']:.2f} | | | "
          + " | ".join(f"{ratios[key]:.2f}" for key in memory_columns) + " |")
    print(f"\nmedian of per-round ratios (noise-robust): {ratios['images_per_s_per_round_median']:.2f}")

    record = {
        "command": shlex.join(["python", *sys.argv]), "config": config.to_dict(), "batch_size": args.batch_size,
        "device": args.device, "dtype": "bf16 autocast" if bf16 else "fp32", "compile": args.compile,
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "torch": torch.__version__, "transformers": transformers.__version__, "models": results,
        "ratio_mae_hf_over_vit_mae": ratios,
        "memory_notes": {"train_state_mb": "parameters, buffers + gradients + AdamW state + unique storages saved for "
                         "backward in one eager forward (those not counted twice); lower bound of the peak",
                         "cuda_peak_mb": "parameters, buffers + AdamW state + rise of "
                         "torch.cuda.max_memory_allocated over one timed chunk; max over rounds (CUDA only)"},
    }
    with open(args.output_json, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"\nratio (mae_hf / ViTMAE) images/s: {ratios['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
