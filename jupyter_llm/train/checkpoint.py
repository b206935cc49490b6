"""Checkpoints that count only once complete, with per-rank RNG state for exact resume."""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiskFull, disk_full_message, has_room
from ..files import now_iso, tree_mb, write_json_atomic
from ..folder import CKPT_MARKER, Event, record_event


class CheckpointError(RuntimeError):
    """A checkpoint marked complete could not be loaded (corrupt or missing files)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            marker = p / CKPT_MARKER
            if marker.is_file():
                try:
                    out.append((int(json.loads(marker.read_text())["step"]), p))
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"checkpoint marker {marker} is unreadable: {e}") from None
    return sorted(out)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def newest(run_dir: Path) -> tuple[int, Path, dict[str, Any]] | None:
    """(step, folder, marker) of the newest complete checkpoint, or None."""
    done = complete_checkpoints(run_dir / "checkpoints")
    if not done:
        return None
    step, path = done[-1]
    return step, path, json.loads((path / CKPT_MARKER).read_text())


def layout(marker: dict[str, Any]) -> tuple[int, int]:
    """(ranks, tensor-parallel degree) a checkpoint was saved with."""
    return int(marker.get("world_size", 0)), int(marker.get("tensor_parallel", 1))


def to_universal(path: Path) -> tuple[Path, float]:
    """DeepSpeed's universal checkpoint of the checkpoint in `path` (ds_to_universal: every
    parameter and optimizer state whole, loadable on any number of ranks and any TP degree),
    made once into `path/universal`; returns it and the seconds the conversion took."""
    import subprocess
    import sys
    import time

    out = path / UNIVERSAL
    if (out / ".converted").is_file():
        return out, 0.0
    shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
         "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
         "--num_merge_workers", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise CheckpointError(
            f"converting checkpoint {path} to a universal checkpoint failed: {' / '.join(tail)}"
        )
    (out / ".converted").write_text(now_iso())
    return out, time.monotonic() - t0


UNIVERSAL = "universal"


def save(engine: Any, run_dir: Path, step: int, rank: int, keep: int, client: dict[str, Any]) -> None:
    """Save on every rank; rank 0 writes the completion marker after all ranks are done."""
    import torch.distributed as dist

    ckpt_dir = run_dir / "checkpoints"
    tag = tag_for(step)
    check_space(engine, ckpt_dir)
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state={"step": step, **client}, save_latest=False
        )
        torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    except OSError as e:  # the space went between the check and the write (another writer)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # never complete: free its space
        raise DiskFull(disk_full_message(ckpt_dir, "a checkpoint", checkpoint_mb(engine, ckpt_dir))) from None
    dist.barrier()
    if rank == 0:
        write_json_atomic(
            ckpt_dir / tag / CKPT_MARKER,
            {
                "step": step,
                "time": now_iso(),
                "world_size": dist.get_world_size(),
                "tensor_parallel": client.get("tensor_parallel", 1),
            },
        )
        record_event(run_dir, Event.CHECKPOINT, step=step, tag=tag)
        prune(ckpt_dir, keep)
    dist.barrier()


def checkpoint_mb(engine: Any, ckpt_dir: Path) -> float:
    """What the next checkpoint will take (MB): the newest complete one's size, else an
    estimate from the parameters (weights and two Adam moments in fp32, and the model's own
    copy), for every rank together."""
    done = complete_checkpoints(ckpt_dir)
    if done:
        return tree_mb(done[-1][1])
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return numel * 16 / 2**20


def check_space(engine: Any, ckpt_dir: Path) -> None:
    """Every rank checks the disk holding `ckpt_dir` before a checkpoint; if one lacks room
    all raise DiskFull together (no rank left waiting in a collective), before a byte is
    written: the earlier complete checkpoints stay as they are."""
    import torch.distributed as dist

    need = checkpoint_mb(engine, ckpt_dir)
    ok = torch.tensor([int(has_room(ckpt_dir, need))], device=getattr(engine, "device", "cpu"))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok.item()):
        raise DiskFull(disk_full_message(ckpt_dir, "a checkpoint", need))


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unmarked leftovers."""
    done = complete_checkpoints(ckpt_dir)
    keep_paths = {p for _, p in done[-keep:]}
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p not in keep_paths:
            shutil.rmtree(p, ignore_errors=True)


def load_latest(
    engine: Any, run_dir: Path, rank: int, universal: bool = False
) -> tuple[int, dict[str, Any]] | None:
    """Load the newest complete checkpoint into the engine; None when there is none. With
    `universal`, its universal conversion (`to_universal`, made by rank 0 before): the ranks
    changed, so the per-rank random streams start afresh."""
    done = complete_checkpoints(run_dir / "checkpoints")
    if not done:
        return None
    step, path = done[-1]
    where, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    try:
        loaded, client = engine.load_checkpoint(
            str(where), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as e:  # torch.load / DeepSpeed raise many types for damaged files
        raise CheckpointError(f"checkpoint {path} is marked complete but cannot be loaded: {e}") from e
    if loaded is None:
        raise CheckpointError(f"checkpoint {path} is marked complete but its model files are missing")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file() and not universal:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return step, client or {}
