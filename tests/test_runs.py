"""The run store and Run handle, without starting jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.errors import RunNotFound, RunStateError
from jupyter_llm.files import append_jsonl, read_jsonl, write_json_atomic
from jupyter_llm.runs import CKPT_MARKER, Run, RunStore
from jupyter_llm.spec import Spec


@pytest.fixture
def spec(corpus: Path) -> Spec:
    return Spec.from_dict({"name": "unit", "data": {"train": str(corpus)}})


def test_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(tmp_path))
    assert RunStore().root == (tmp_path / "runs").resolve()
    monkeypatch.delenv("JUPYTER_LLM_HOME")
    monkeypatch.chdir(tmp_path)
    assert RunStore().root == (tmp_path / "llm-runs").resolve()


def test_create_writes_the_folder(spec: Spec) -> None:
    run = RunStore().create(spec)
    assert run.state == "created"
    assert Spec.from_yaml((run.path / "spec.yaml").read_text()) == spec
    assert json.loads((run.path / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    st = run.status()
    for key in ("state", "run_id", "pid", "started_at", "ended_at", "exit_code", "error"):
        assert key in st
    assert st["run_id"] == run.id and run.events()[0]["event"] == "created"


def test_ids_sortable_and_unique(spec: Spec) -> None:
    store = RunStore()
    runs = [store.create(spec) for _ in range(30)]
    assert len({r.id for r in runs}) == 30
    assert [r.id for r in runs] == sorted(r.id for r in runs)  # creation order == sort order
    assert store.list() == runs
    assert store.get() == runs[-1]  # newest by default
    others = [r.id for r in runs if r != runs[3]]
    unique = next(
        runs[3].id[:n] for n in range(1, 99) if not any(o.startswith(runs[3].id[:n]) for o in others)
    )
    assert store.get(unique) == runs[3]  # the shortest unique prefix
    with pytest.raises(RunNotFound, match="matches several runs"):
        store.get(runs[3].id[:8])  # the date alone: every run
    assert store.get(runs[3].id) == runs[3]


@pytest.mark.parametrize("bad", ["../etc", "/etc/passwd", "..", "a/b", "%2e%2e", "x\x00y", ""])
def test_run_ids_cannot_escape_root(bad: str, spec: Spec) -> None:
    RunStore().create(spec)
    with pytest.raises(RunNotFound):
        RunStore().get(bad)


def test_symlinked_run_is_ignored(spec: Spec, tmp_path: Path) -> None:
    store = RunStore()
    real = store.create(spec)
    outside = tmp_path / "outside"
    real.path.rename(outside)
    (store.root / "20990101-000000-000-evil-0000").symlink_to(outside)
    assert store.list() == []
    with pytest.raises(RunNotFound):
        store.get("20990101-000000-000-evil-0000")


def test_get_by_name_and_errors(spec: Spec) -> None:
    store = RunStore()
    with pytest.raises(RunNotFound, match="no runs"):
        store.get()
    run = store.create(spec)
    assert store.get("unit") == run
    with pytest.raises(RunNotFound, match="no run"):
        store.get("nope")


def test_jsonl_torn_last_line(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    append_jsonl(f, {"step": 1})
    with open(f, "a") as fh:
        fh.write('{"step": 2, "lo')  # a writer caught mid-line
    lines, off = read_jsonl(f)
    assert lines == [{"step": 1}]
    with open(f, "a") as fh:
        fh.write('ss": 1.0}\n')
    more, _ = read_jsonl(f, off)
    assert more == [{"step": 2, "loss": 1.0}]


def test_metrics_dedupe_keeps_newest_attempt(spec: Spec) -> None:
    run = RunStore().create(spec)
    for attempt, steps in ((1, [5, 10, 15]), (2, [15, 20])):
        for s in steps:
            append_jsonl(
                run.path / "metrics.jsonl", {"step": s, "time": 0, "loss": float(attempt), "attempt": attempt}
            )
    append_jsonl(run.path / "metrics.jsonl", {"step": 20, "time": 0, "val_loss": 1.0})
    m = run.metrics()
    assert [(x["step"], x.get("attempt")) for x in m] == [(5, 1), (10, 1), (15, 2), (20, 2), (20, None)]
    assert len(run.metrics(dedupe=False)) == 6


def test_dead_supervisor_reads_as_failed(spec: Spec) -> None:
    run = RunStore().create(spec)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    st = json.loads((run.path / "status.json").read_text())
    write_json_atomic(run.path / "status.json", {**st, "state": "running", "pid": p.pid})
    assert run.state == "failed" and run.status()["lost"] is True
    assert json.loads((run.path / "status.json").read_text())["state"] == "running"  # readers never write
    live = {**st, "state": "running", "pid": os.getpid()}
    write_json_atomic(run.path / "status.json", live)
    assert run.state == "running"


def test_checkpoints_need_marker(spec: Spec) -> None:
    run = RunStore().create(spec)
    for step, marked in ((10, True), (20, True), (30, False)):
        d = run.path / "checkpoints" / f"step{step:08d}"
        d.mkdir(parents=True)
        if marked:
            write_json_atomic(d / CKPT_MARKER, {"step": step})
    assert [p.name for p in run.checkpoints()] == ["step00000010", "step00000020"]


def test_actions_check_state(spec: Spec) -> None:
    run = RunStore().create(spec)
    with pytest.raises(RunStateError):
        run.stop()
    st = json.loads((run.path / "status.json").read_text())
    write_json_atomic(run.path / "status.json", {**st, "state": "completed"})
    with pytest.raises(RunStateError, match="completed"):
        run.resume()
    assert run.stop() == "completed"
    assert Run(run.path).final_model is None


def test_metrics_read_only_what_was_appended(spec: Spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling readers re-read nothing old; a torn line waits; a rewritten file is read again."""
    import jupyter_llm.files as files

    run = RunStore().create(spec)
    f = run.path / "metrics.jsonl"
    append_jsonl(f, {"step": 1, "loss": 3.0})
    assert [m["step"] for m in run.metrics()] == [1]
    reads: list[int] = []
    real = files.read_jsonl
    monkeypatch.setattr(files, "read_jsonl", lambda p, offset=0: reads.append(offset) or real(p, offset))
    with open(f, "ab") as fh:
        fh.write(b'{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # a writer mid-append
    assert [m["step"] for m in run.metrics()] == [1, 2]
    with open(f, "ab") as fh:
        fh.write(b'ss": 1.0}\n')
    assert [m["step"] for m in run.metrics(dedupe=False)] == [1, 2, 3]
    assert run.metrics() == run.metrics() and reads[0] > 0  # read from the offset, not from 0
    assert len(reads) == 2  # nothing appended since: no read at all
    f.write_text('{"step": 7, "loss": 0.5}\n')  # replaced (smaller): read again from the start
    assert [m["step"] for m in run.metrics()] == [7]


def test_the_one_tailer(tmp_path: Path) -> None:
    """files.Tail (the dashboard feed, the sweep controller, Run.follow and the polling readers
    use it): only new complete lines; a replaced, truncated or removed file starts over."""
    from jupyter_llm.files import Tail

    f = tmp_path / "m.jsonl"
    tail = Tail(f)
    assert tail.read() == [] and not tail.restarted  # not there yet
    append_jsonl(f, {"step": 1})
    with open(f, "ab") as fh:
        fh.write(b'{"step": 2')  # mid-append
    assert tail.read() == [{"step": 1}] and tail.read() == []
    with open(f, "ab") as fh:
        fh.write(b"}\n")
    assert tail.read() == [{"step": 2}] and not tail.restarted
    new = tmp_path / "new.jsonl"
    new.write_text('{"step": 9}\n')
    os.replace(new, f)  # another file under the name (a resumed run's rewrite, say)
    assert tail.read() == [{"step": 9}] and tail.restarted
    tail.restarted = False
    f.unlink()
    assert tail.read() == [] and tail.restarted


def test_the_one_stop_ladder(monkeypatch: pytest.MonkeyPatch) -> None:
    """watch.StopLadder (local, ssh/pdsh nodes and Slurm use it): nothing before the grace
    period, then SIGINT, SIGTERM SIGINT_WAIT_S later, SIGKILL SIGTERM_WAIT_S after, each once."""
    from jupyter_llm.launcher import watch

    now = [100.0]
    monkeypatch.setattr(watch.time, "monotonic", lambda: now[0])
    ladder = watch.StopLadder(grace_s=30)
    assert ladder.due(None) == []  # no stop requested
    asked = 100.0
    now[0] = 129.0
    assert ladder.due(asked) == []
    now[0] = 130.0
    assert ladder.due(asked) == [("SIGINT", 30.0)] and ladder.due(asked) == []
    now[0] = 130.0 + watch.SIGINT_WAIT_S + watch.SIGTERM_WAIT_S + 1  # a slow poll: both at once
    assert [name for name, _ in ladder.due(asked)] == ["SIGTERM", "SIGKILL"] and ladder.due(asked) == []


def test_the_one_final_state_decision(spec: Spec) -> None:
    """Attempt.conclude decides every backend's end of an attempt (local, ssh, pdsh, Slurm)."""
    import signal as sig

    from jupyter_llm.files import append_jsonl as log_event
    from jupyter_llm.launcher.attempt import Attempt, StopFlag

    def ended(rc: int, **setup: Any) -> dict[str, Any]:
        run = RunStore().create(spec)
        att = Attempt(run, 1, resume=False, stop=StopFlag(setup.get("stop")))
        if setup.get("final"):
            (run.path / "final").mkdir()
            (run.path / "final" / "config.json").write_text("{}")
        att.hung = setup.get("hung")
        if setup.get("stopped_at"):
            log_event(run.path / "events.jsonl", {"event": "stopped_at", "step": 7})
        att.conclude(rc, lambda: ("rank 1 failed: Boom: no", {"cause": "exception", "rank": 1}))
        return run.status()

    assert ended(0, final=True)["state"] == "completed"
    st = ended(-9, hung="hung: no progress for 5 s (train.hang_timeout_s); stopped")
    assert st["state"] == "failed" and st["error"].startswith("hung:")
    assert ended(0, stop=sig.SIGTERM, stopped_at=True)["state"] == "stopped"
    st = ended(-9, stop=sig.SIGTERM)
    assert st["state"] == "stopped" and st["error"].startswith("stopped without a final checkpoint")
    assert "no final model" in ended(0)["error"]
    st = ended(1)
    assert st["state"] == "failed" and st["error"] == "rank 1 failed: Boom: no" and st["failure"]["rank"] == 1
