"""Where a run's images live — decoded in memory, or read from disk by DataLoader workers — decided once, from
the data's decoded size and the memory this process may use, and said out loud."""

import os

import torch

MEMORY_SHARE = 0.5  # of this process's share of the free memory, the rest for the model, workers and the system


def _read_number(path: str, key: str | None = None) -> int | None:
    """The number a file holds, or (`key`) the one after `key` on its "key value" lines; None if none."""
    try:
        with open(path) as handle:
            if key is None:
                text = handle.read().strip()
                return int(text) if text.isdigit() else None
            for line in handle:
                name, *values = line.replace(":", " ").split() or [""]
                if name == key:
                    return int(values[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def processes_on_this_machine() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def memory_budget() -> tuple[int, str]:
    """(bytes, explanation) this process may fill with decoded images: a share of the machine's available memory, or
    of what the container's limit leaves when that is lower."""
    free, source = _read_number("/proc/meminfo", "MemAvailable"), "available memory"  # in kB
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if free is None else free * 1024
    # A container's limit (cgroup v2, then v1) less its usage, whose page cache the kernel gives back under pressure:
    # its inactive part counts as free, as Docker and the kubelet count it.
    for folder, limit_name, usage_name, stat_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        limit, usage = _read_number(f"{folder}/{limit_name}"), _read_number(f"{folder}/{usage_name}")
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with a huge number
            container = max(0, limit - usage + (_read_number(f"{folder}/memory.stat", stat_key) or 0))
            if container < free:
                free, source = container, "free under the container's memory limit"
            break
    processes = processes_on_this_machine()
    budget = int(free * MEMORY_SHARE / processes)
    share = f" / {processes} processes on this machine" if processes > 1 else ""
    return budget, f"{MEMORY_SHARE:g} x {free / 2**30:.1f} GB {source}{share}"


def all_processes_agree(flag: bool) -> bool:
    """`flag` on every process of a distributed run (torchrun, accelerate) — one process without memory to spare
    makes every process read from disk, so that all of them take the same data path."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, bool(flag))
    return all(flags)


def gigabytes(num_bytes: int) -> str:
    """A size for people: KB below a megabyte, MB below a gigabyte, GB above."""
    if num_bytes < 2**20:
        return f"{num_bytes / 2**10:,.1f} KB"
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:,.1f} MB"
    return f"{num_bytes / 2**30:.1f} GB" if num_bytes < 10 * 2**30 else f"{num_bytes / 2**30:,.0f} GB"
