"""A run folder written before status.json's format was numbered (tests/fixtures/format0: a
real 1-rank run, stopped at step 25 with its checkpoint, written by the main of 2026-12-03)
still lists, shows its status, evaluates and resumes; the resumed supervisor rewrites its
status in the current format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jupyter_llm.folder import STATUS_FORMAT, Event, RunStatus, write_status
from jupyter_llm.runs import RunStore, State

FIXTURE = Path(__file__).parent / "fixtures" / "format0"
WRITTEN_WITH = "/tmp/fx/corpus.txt"  # where the fixture's data was; the test's corpus has the same text


def _copy(tmp_path: Path, corpus: Path) -> RunStore:
    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root)
    for spec in root.glob("*/spec.yaml"):  # the data is elsewhere on this machine
        spec.write_text(spec.read_text().replace(WRITTEN_WITH, str(corpus)))
    return RunStore(root)


def test_a_format0_folder_lists_and_reads(tmp_path: Path, corpus: Path) -> None:
    store = _copy(tmp_path, corpus)
    (run,) = store.list()
    assert store.get("format0") == run
    raw = run.status_raw()
    assert raw is not None and "format" not in raw  # as written then
    st = run.status()
    assert st["format"] == 0 and st["state"] == "stopped" and st["attempt"] == 1 and st["error"] is None
    assert [json.loads((p / "COMPLETE").read_text())["step"] for p in run.checkpoints()] == [25]
    assert "step 25/60" in run.summary()
    assert run.spec.train.max_steps == 60 and run.metrics()[-1]["step"] == 25
    # the event names of that day are the ones declared today (folder.Event)
    assert {e["event"] for e in run.events()} <= {e.value for e in Event}


def test_the_one_status_writer_validates_and_numbers_the_format(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "custom": "kept"}))
    st = write_status(tmp_path, State.STOPPED, exit_code=0)
    on_disk = json.loads((tmp_path / "status.json").read_text())
    assert on_disk["format"] == STATUS_FORMAT and on_disk["state"] == "stopped" and on_disk["pid"] == 1
    assert on_disk["custom"] == "kept" and st.exit_code == 0  # a newer writer's key survives
    with pytest.raises(ValueError, match="state"):
        write_status(tmp_path, "exploded")  # type: ignore[arg-type]
    assert RunStatus.model_validate(json.loads((tmp_path / "status.json").read_text())).state == State.STOPPED


@pytest.mark.deepspeed
def test_a_format0_run_evaluates_and_resumes(tmp_path: Path, corpus: Path) -> None:
    store = _copy(tmp_path, corpus)
    run = store.get("format0")
    ev = run.evaluate(checkpoint="latest", prompts=["ROMEO:"], max_new_tokens=8, wait=True, timeout=300)
    assert ev.state == "completed", ev.summary()
    assert ev.result["checkpoint"] == "step-25" and ev.result["perplexity"]["ppl"] > 1
    # the data cache the fixture names (/tmp/fx/...) is not on this machine: prepared again
    assert (Path(json.loads((run.path / "data.json").read_text())["path"]) / "index.json").is_file()
    run.resume()
    assert run.wait(600) == "completed", run.log_tail(40, rank=0)
    assert [e for e in run.events() if e["event"] == "resumed_from"][-1]["step"] == 25
    st = run.status_raw()
    assert st is not None and st["format"] == STATUS_FORMAT and st["attempt"] == 2
    assert run.final_model is not None and max(m["step"] for m in run.metrics()) == 60
    # every name the supervisor and the ranks wrote is a declared one
    assert {e["event"] for e in run.events()} <= {e.value for e in Event}
