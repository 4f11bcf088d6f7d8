"""Copies between the host and the training device that never make the host wait for the device."""

import torch


def to_device(tensor, device) -> torch.Tensor:
    """A host tensor (or numpy array) on `device`: to a GPU through pinned memory and without blocking, so the copy
    waits neither for the GPU's queue nor makes the host wait for it; unchanged when it is there already."""
    tensor = torch.as_tensor(tensor)
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def synchronize(device) -> None:
    """Wait for the work queued on `device` (a CUDA GPU; nothing to wait for elsewhere): before reading a clock, or
    host memory that a non-blocking copy from the device fills."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
