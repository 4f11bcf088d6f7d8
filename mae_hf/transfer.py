"""Copies between the host and the training device that never make the host wait for the device."""

import torch


def to_device(tensor, device) -> torch.Tensor:
    """A host tensor (or numpy array) on `device`, copied to a GPU from pinned memory without blocking either side."""
    tensor = torch.as_tensor(tensor)
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def synchronize(device) -> None:
    """Wait for the work queued on a CUDA `device`: before reading a clock, or what a non-blocking copy fills."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
