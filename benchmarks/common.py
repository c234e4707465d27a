"""What every benchmark report shares: where it was measured, and how that is written."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

__all__ = ["describe_machine", "machine"]


def machine(device: torch.device | str = "cpu") -> dict:
    """Where the numbers were measured: CPU, cores, threads, versions and the GPU if used."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict | str) -> str:
    """One line for a report: 'AMD EPYC, 2 cores, 2 torch threads' (a GPU first when used).

    Older reports stored a plain string; it is returned as it is.
    """
    if isinstance(info, str):
        return info
    where = f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    return f"{info['gpu']} (host: {where})" if "gpu" in info else where
