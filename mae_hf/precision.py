"""bf16 or fp32: the one place that decides how the models compute, for every script (pretraining, fine-tuning, the
probes and kNN, visualize.py, the benchmark) and the demo.

bf16 autocast by default where the hardware computes bf16 natively (an NVIDIA GPU of compute capability 8.0 or newer,
a ROCm GPU that supports it, a CPU with AMX, AVX512-BF16 or Arm's BF16); fp32 elsewhere, where bf16 is emulated and
slower (asked for, it still runs, after a one-line warning). fp32 on those NVIDIA GPUs computes matrix products in
TF32. Measured in docs/cpu_speed.md.

This file imports only torch: the demo loads it by path, next to its app, where mae_hf is not installed.
"""

import contextlib
import sys

import torch

BF16_AUTO_HELP = ("true, false or auto (the default: on where the device computes bf16 natively — an NVIDIA GPU of "
                  "compute capability 8.0 or newer, a CPU with AMX, AVX512-BF16 or Arm's BF16; off elsewhere).")

# CPU capabilities (`torch.cpu.get_capabilities()`) that compute bf16 matrix products in hardware, best first.
CPU_BF16_FEATURES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("sve_bf16", "Arm SVE BF16"),
                     ("bf16", "Arm BF16"))


def cpu_capabilities() -> dict:
    """`torch.cpu.get_capabilities()` (torch >= 2.9); on older torch, the two x86 probes it had."""
    if hasattr(torch.cpu, "get_capabilities"):
        return dict(torch.cpu.get_capabilities())
    return {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}


def ampere_or_newer(device) -> bool:
    """An NVIDIA GPU of compute capability 8.0 or newer, the first with bf16 and TF32 tensor cores (older ones emulate
    bf16); not ROCm, whose GPUs report other capabilities."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None
            and tuple(torch.cuda.get_device_capability(device)) >= (8, 0))


def native_bf16(device) -> str | None:
    """What computes bf16 natively on `device` ("AMX", "AVX512-BF16", ..., "CUDA"), or None where it is emulated
    (or not known to be native: devices other than CPUs and CUDA GPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.version.hip is not None:  # ROCm: its own answer (MI200 and newer)
        return "ROCm" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "cuda":
        return "CUDA" if ampere_or_newer(device) else None
    if device.type == "cpu":
        capabilities = cpu_capabilities()
        return next((name for key, name in CPU_BF16_FEATURES if capabilities.get(key)), None)
    return None


def warn_if_emulated(flag: str, device) -> bool:
    """Whether `device` is a CPU that emulates bf16; if so, a one-line warning on stderr that `flag` runs slow."""
    emulated = torch.device(device).type == "cpu" and native_bf16(device) is None
    if emulated:
        print(f"warning: {flag} on a CPU without native bf16 (no AMX, AVX512-BF16 or Arm BF16): bf16 is emulated "
              "there and runs slower than fp32.", file=sys.stderr, flush=True)
    return emulated


def decide_bf16(requested: bool | None, device, switch: bool = False, tf32: bool | None = None) -> tuple[bool, str]:
    """`(bf16, precision)`: whether to autocast to bf16 on `device`, and the precision in words with the reason, for
    plan lines and results. `requested` None means the default (native bf16 or not); True on a CPU without native
    bf16 runs bf16 after a one-line warning on stderr. `switch`: the script spells the flag `--bf16` / `--no-bf16`
    (argparse's BooleanOptionalAction) rather than `--bf16 true` / `--bf16 false`. An fp32 run on an Ampere or newer
    GPU gets TF32 matrix products (turned on here) unless `tf32` is False."""
    on, off = ("--bf16", "--no-bf16") if switch else ("--bf16 true", "--bf16 false")
    device = torch.device(device)
    native = native_bf16(device)
    where = "this CPU" if device.type == "cpu" else f"this {device.type} device"
    if requested is None:
        bf16 = native is not None
        slower = ", where bf16 runs slower than fp32" if device.type == "cpu" else ""
        precision = (f"bf16 autocast (default: {where} computes bf16 natively, {native})" if bf16
                     else f"fp32 (default: {where} has no native bf16{slower})")
    elif requested and warn_if_emulated(on, device):
        bf16, precision = True, f"bf16 autocast ({on}; emulated on this CPU, slower than fp32)"
    else:
        bf16, precision = bool(requested), f"bf16 autocast ({on})" if requested else f"fp32 ({off})"
    if not bf16 and tf32 is not False and ampere_or_newer(device):
        torch.set_float32_matmul_precision("high")
        precision += ", matrix products in TF32 (Ampere or newer)"
    return bf16, precision


def autocast_for(device, bf16: bool):
    """bf16 autocast on `device` when `bf16` (CUDA and CPU), else a context that changes nothing."""
    device = torch.device(device)
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
