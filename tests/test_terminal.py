"""The start-up phases every view shows (summary.startup) and the terminal's piped lines, read
from run folders written the way the supervisor and rank 0 write them. (A real `train --wait`
on a terminal is in test_deepspeed.py.)"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import psutil

from conftest import tiny_spec
from jupyter_llm.files import append_jsonl, now_iso, write_json_atomic
from jupyter_llm.folder import EVENTS_FILE, METRICS_FILE, State, write_status
from jupyter_llm.runs import RunStore
from jupyter_llm.spec import Spec
from jupyter_llm.summary import startup
from jupyter_llm.terminal import TerminalView


def test_the_start_up_phases_in_order_then_none_once_a_metric_arrives(corpus: Path, tmp_path: Path) -> None:
    run = RunStore(tmp_path).create(Spec.from_dict(tiny_spec(corpus, train={"max_steps": 40})))
    assert startup(run) == {"phase": "created", "detail": "waiting for its supervisor"}
    me = {"pid": os.getpid(), "pid_create_time": psutil.Process().create_time()}
    write_status(run.path, State.STARTING, phase="data", **me)  # a cluster run's supervisor at work
    assert startup(run)["phase"] == "preparing data"
    time.sleep(0.01)
    append_jsonl(run.path / EVENTS_FILE, {"time": now_iso(), "event": "launched", "ranks": 2})
    write_status(run.path, State.RUNNING, phase=None, world_size=2)
    assert startup(run) == {"phase": "starting ranks", "detail": "2 rank(s) importing torch and DeepSpeed"}
    write_json_atomic(run.path / "progress.json", {"phase": "tokenize", "bytes_done": 450, "bytes_total": 1000,
                                                   "tokens": 9, "time": time.time()})  # fmt: skip
    assert startup(run) == {"phase": "preparing data", "detail": "tokenizing 45%"}
    append_jsonl(run.path / EVENTS_FILE, {"time": now_iso(), "event": "data_ready"})
    assert startup(run)["phase"] == "building the model"
    append_jsonl(
        run.path / EVENTS_FILE, {"time": now_iso(), "event": "model_ready", "validation_first": True}
    )
    assert startup(run) == {"phase": "first step", "detail": "validating at step 0"}
    append_jsonl(run.path / METRICS_FILE, {"step": 0, "time": time.time(), "val_loss": 4.2})
    assert startup(run) is None
    # a restart: the earlier attempt's metrics do not count for the new one
    time.sleep(0.01)
    append_jsonl(run.path / EVENTS_FILE, {"time": now_iso(), "event": "launched", "ranks": 2})
    assert startup(run)["phase"] == "starting ranks"
    write_status(run.path, State.COMPLETED, ended_at=now_iso())
    assert startup(run) is None


def test_piped_terminal_lines_name_the_phase_once_and_each_step_with_total_and_eta(
    corpus: Path, tmp_path: Path
) -> None:
    run = RunStore(tmp_path).create(Spec.from_dict(tiny_spec(corpus, train={"max_steps": 40})))
    me = {"pid": os.getpid(), "pid_create_time": psutil.Process().create_time()}
    write_status(run.path, State.RUNNING, world_size=1, **me)
    append_jsonl(run.path / EVENTS_FILE, {"time": now_iso(), "event": "launched", "ranks": 1})
    out = io.StringIO()
    view = TerminalView(run, out, tty=False)
    view.refresh()
    view.refresh()  # the same phase again: no second line
    t = time.time()
    for step in (10, 20):
        append_jsonl(run.path / METRICS_FILE, {"step": step, "time": t + step, "loss": 3.0 - step / 100,
                                               "lr": 1e-3, "tokens_per_s": 1234.0})  # fmt: skip
    view.refresh()
    lines = out.getvalue().splitlines()
    assert lines == [
        f"{run.id}: starting ranks: 1 rank(s) importing torch and DeepSpeed",
        "step 10/40: loss=2.9 lr=0.001 tokens/s=1234",
        "step 20/40: loss=2.8 lr=0.001 tokens/s=1234, ETA 0m20s",  # 1 s a step, 20 steps to go
    ]


def test_last_jsonl_reads_only_the_newest_complete_lines(tmp_path: Path) -> None:
    from jupyter_llm.files import last_jsonl

    f = tmp_path / "system.jsonl"
    for i in range(1000):
        append_jsonl(f, {"i": i, "node": "n"})
    tail = last_jsonl(f, nbytes=200)
    assert tail and tail[-1]["i"] == 999 and [r["i"] for r in tail] == list(range(tail[0]["i"], 1000))
    assert len(tail) < 20  # the end of the file, not all of it
    assert last_jsonl(tmp_path / "missing.jsonl") == []
