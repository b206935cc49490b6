"""The copies both ways without a shared filesystem: the push of the run folder, the data and
a pretrained model to every node; the pull (`Syncer`) of what the job writes there back into
the local run folder; the shared ssh connections the many rsync calls reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..cluster import Cluster
from ..files import append_jsonl
from ..folder import EVENTS_FILE, FINAL_DIR
from .remote import Node, rsync_argv, run_quiet, ssh_options

# run-folder entries the nodes need (pushed); the rest is written by the job or the supervisor
PUSH_EXCLUDE = ["/logs/", "/control/", "/nodes/", "/evals/", "/final/", "/.final.tmp/", "/status.json",
                "/events.jsonl", "/metrics.jsonl", "/grads.jsonl", "/progress.json", "/data.json",
                "/manifest.json", "/failures/", "/ranks/", "/export_check.pt"]  # fmt: skip
# what comes back from a node into its staging folder (nodes/nodeK/ of the local run)
PULL_INCLUDE = ["/metrics.jsonl", "/grads.jsonl", "/events.jsonl", "/export_check.pt", "/logs/",
                "/logs/rank*.log", "/ranks/***", "/failures/***", "/checkpoints/***", "/final/***"]  # fmt: skip


class Syncer:
    """Brings the job's files back from the nodes into the local run folder.

    Each node's files land in a staging folder (`nodes/nodeK/`) first; from there the
    append-only files of rank 0's node (metrics, gradients, its events) are appended to
    the local ones, rank logs and records are copied, and a checkpoint is assembled from
    every node's part once node 0 has marked it complete (node 0 is pulled before the
    others, so the parts of a marked checkpoint are whole by then)."""

    def __init__(
        self, cluster: Cluster, nodes: list[Node], run_dir: Path, marker: str, control: str | None = None
    ):
        self.cluster, self.nodes, self.dir, self.marker = cluster, nodes, run_dir, marker
        self.control = control
        self.events_off: int | None = None
        self.errors: list[str] = []

    def stage(self, node: Node) -> Path:
        return self.dir / "nodes" / f"node{node.index}"

    def pull(self, node: Node) -> bool:
        filt = [f"--include={p}" for p in PULL_INCLUDE] + ["--exclude=*", "--delete", "--prune-empty-dirs"]
        argv = rsync_argv(self.cluster, node.host, node.run_dir + "/", str(self.stage(node)) + "/", push=False,
                          extra=filt, control=self.control)  # fmt: skip
        rc, err = run_quiet(argv, timeout=300)
        if rc not in (0, 23, 24):  # 23/24: some files vanished meanwhile (a pruned checkpoint)
            self.errors.append(f"{node.label}: {err}")
            return False
        return True

    def start(self) -> None:
        """Before the job starts: where the node's events file ends now."""
        self.pull(self.nodes[0])
        self.events_off = _size(self.stage(self.nodes[0]) / EVENTS_FILE)

    def cycle(self, final: bool = False) -> None:
        for node in self.nodes:  # node 0 first: its checkpoint markers before the others' parts
            self.pull(node)
        s0 = self.stage(self.nodes[0])
        for name in ("metrics.jsonl", "grads.jsonl"):
            _append_new(s0 / name, self.dir / name)
        self._events(s0 / EVENTS_FILE)
        for node in self.nodes:
            st = self.stage(node)
            for sub, pattern in (("logs", "rank*.log"), ("ranks", "rank*.json"), ("failures", "rank*.json")):
                for f in st.glob(f"{sub}/{pattern}"):
                    _copy_if_changed(f, self.dir / sub / f.name)
        self._checkpoints()
        if final:
            if (s0 / FINAL_DIR).is_dir():
                _replace_tree(s0 / "final", self.dir / FINAL_DIR)
            if (s0 / "export_check.pt").is_file():
                _copy_if_changed(s0 / "export_check.pt", self.dir / "export_check.pt")

    def _events(self, staged: Path) -> None:
        if self.events_off is None or not staged.is_file():
            return
        with open(staged, "rb") as f:
            f.seek(self.events_off)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                append_jsonl(self.dir / EVENTS_FILE, json.loads(line))
        self.events_off += end

    def _checkpoints(self) -> None:
        s0 = self.stage(self.nodes[0]) / "checkpoints"
        marked = {p.parent.name for p in s0.glob(f"*/{self.marker}")}
        local = self.dir / "checkpoints"
        local.mkdir(exist_ok=True)
        for tag in sorted(marked):
            if (local / tag / self.marker).is_file():
                continue
            tmp = local / f".{tag}.assembling"
            shutil.rmtree(tmp, ignore_errors=True)
            for node in self.nodes:
                src = self.stage(node) / "checkpoints" / tag
                if src.is_dir():
                    shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
            shutil.rmtree(local / tag, ignore_errors=True)
            os.replace(tmp, local / tag)
        if (s0).is_dir():  # pruned on node 0: prune here too
            for p in local.iterdir():
                if (
                    p.is_dir()
                    and not p.name.startswith(".")
                    and p.name not in marked
                    and (p / self.marker).is_file()
                ):
                    shutil.rmtree(p, ignore_errors=True)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _append_new(src: Path, dst: Path) -> None:
    """Append the complete lines `src` has beyond `dst`'s length (the local copy of an
    append-only file the node writes)."""
    have = _size(dst)
    if _size(src) <= have:
        return
    with open(src, "rb") as f:
        f.seek(have)
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end:
        with open(dst, "ab") as out:
            out.write(data[:end])


def _copy_if_changed(src: Path, dst: Path) -> None:
    with contextlib.suppress(OSError):
        s = src.stat()
        with contextlib.suppress(OSError):
            d = dst.stat()
            if d.st_size == s.st_size and d.st_mtime >= s.st_mtime:
                return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.sync")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.sync")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def push(cluster: Cluster, nodes: list[Node], run_dir: Path, data_dir: Path | None, pretrained: str | None,
         log: Callable[[str], None], control: str | None = None) -> list[str]:  # fmt: skip
    """Copy the run folder (spec, tokenizer, hostfile, checkpoints), the prepared data and a
    pretrained model's folder to every node at once; returns the problems."""

    def one(node: Node) -> list[str]:
        t0 = time.monotonic()
        pairs = [(str(run_dir) + "/", node.run_dir + "/", [f"--exclude={p}" for p in PUSH_EXCLUDE])]
        if data_dir is not None:
            pairs.append((str(data_dir) + "/", node.run_dir + "/data/", []))
        if pretrained is not None:
            pairs.append((pretrained.rstrip("/") + "/", node.run_dir + "/pretrained/", []))
        for src, dst, extra in pairs:
            rc, err = run_quiet(
                rsync_argv(cluster, node.host, src, dst, push=True, extra=extra, control=control)
            )
            if rc != 0:
                return [f"{node.label}: copying the run folder failed (rsync exit {rc}): {err}"]
        log(f"{node.label}: synced in {time.monotonic() - t0:.1f} s")
        return []

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        return [e for errs in pool.map(one, nodes) for e in errs]


def close_shared(cluster: Cluster, nodes: list[Node], control: str) -> None:
    """End the shared connections (`ssh -O exit`) and remove their folder. None were opened
    when nothing was copied (a shared filesystem, Slurm): no ssh call then."""
    for n in nodes if any(Path(control).iterdir()) else []:
        argv = ["ssh", *ssh_options(cluster, n.host, control), "-O", "exit", "--", n.host.host]
        run_quiet(argv, timeout=10)
    shutil.rmtree(control, ignore_errors=True)


def tree_bytes(*paths: Path | None) -> int:
    total = 0
    for p in paths:
        if p is None or not p.exists():
            continue
        for f in [p] if p.is_file() else p.rglob("*"):
            with contextlib.suppress(OSError):
                if f.is_file():
                    total += f.stat().st_size
    return total


__all__ = ["PULL_INCLUDE", "PUSH_EXCLUDE", "Syncer", "close_shared", "push", "tree_bytes"]
