"""What every benchmark records about the machine it ran on and the models it measured."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info(threads: int | None = None) -> dict:
    """CPU model, bf16/AMX flags, cores, torch threads and versions, GPU if any."""
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", "x86_64", platform.machine()):
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu": cpu,
        "bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def model_sha256(model: str) -> str:
    """sha256 of a model's weights file: a name can mean other weights in a later report."""
    from napari_selfreg.modelfile import resolve_model_path, weights_sha256

    return weights_sha256(resolve_model_path(model))
