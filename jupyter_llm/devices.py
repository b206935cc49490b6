"""This machine's GPUs as a job started here may use them: nvidia-smi and CUDA_VISIBLE_DEVICES,
never torch (the kernel and the supervisor hold no CUDA context)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


def gpu_count() -> int:
    """GPUs this job may use: those CUDA_VISIBLE_DEVICES names, else every GPU nvidia-smi
    lists (no torch, no CUDA context)."""
    visible = visible_gpus(os.environ)
    return len(_smi_gpus()) if visible is None else len(visible)


def _smi_gpus() -> list[str]:
    """`nvidia-smi -L`'s lines ("GPU 0: NVIDIA H200 (UUID: GPU-...)"), [] without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]


def visible_gpus(env: Mapping[str, str], smi_lines: list[str] | None = None) -> list[int] | None:
    """The physical indices CUDA_VISIBLE_DEVICES selects (None: unset, every GPU), read as
    CUDA reads it: indices or GPU UUIDs (or their prefixes), up to the first entry that names
    no GPU."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    lines = _smi_gpus() if smi_lines is None else smi_lines
    uuids = [ln.rpartition("UUID: ")[2].rstrip(")") for ln in lines]
    out: list[int] = []
    for item in (x.strip() for x in value.split(",")):
        if item.isdigit() and int(item) < len(lines):
            index = int(item)
        else:
            index = next((i for i, u in enumerate(uuids) if item and u.startswith(item)), -1)
        if index < 0 or index in out:
            break
        out.append(index)
    return out


__all__ = ["gpu_count", "visible_gpus"]
