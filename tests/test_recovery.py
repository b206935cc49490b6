"""Hostile and damaged input (issue 18): YAML bombs, bytes that are not UTF-8, damaged run
folders, unchecked pipeline parameters, and a launch on a full disk. Each was a hang, a
traceback or a run that vanished from the listings; each is now a clear error or a row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import jupyter_llm
from conftest import REPO, tiny_spec
from jupyter_llm.errors import SpecError, UserError
from jupyter_llm.inputs import MAX_INPUT_BYTES, InputError, load_yaml
from jupyter_llm.runs import RunStore
from jupyter_llm.spec import Spec


def cli(*args: str, root: Path | None = None) -> subprocess.CompletedProcess[str]:
    pre = ["--root", str(root)] if root else []
    return subprocess.run([sys.executable, "-m", "jupyter_llm.cli", *pre, *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)  # 9 levels x 9 aliases: 387 million strings once expanded


def test_a_yaml_alias_bomb_is_refused_at_once_in_every_reader(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expands to more than 100,000 values"):
        load_yaml(BOMB)
    with pytest.raises(SpecError, match="expands to more than"):
        Spec.from_yaml(BOMB)
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    done = cli("train", str(f), "--dry-run")  # used to grow past 5 GB building the error's repr
    assert done.returncode == 2 and "expands to more than" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(InputError, match="refers to itself"):
        load_yaml("a: &a [1, *a]")
    with pytest.raises(InputError, match="nested too deeply"):
        load_yaml("[" * 50_000 + "]" * 50_000)
    with pytest.raises(InputError, match="allowed"):
        load_yaml("x: " + "y" * MAX_INPUT_BYTES)
    assert load_yaml("base: &b {lr: 1}\nrun: *b\n") == {
        "base": {"lr": 1},
        "run": {"lr": 1},
    }  # aliases still work


def test_a_spec_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path, ip: Any) -> None:
    from IPython.core.error import UsageError

    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    done = cli("train", str(f), "--dry-run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "not UTF-8 text: byte 0xe9 at offset 9 (line 1)" in done.stderr
        and "save the file as UTF-8" in done.stderr
    )
    with pytest.raises(UsageError, match="byte 0xe9 at offset 9"):
        ip.run_line_magic("llm_train", f"{f} --dry-run")


def test_a_damaged_status_is_listed_as_damaged_and_hides_no_other_run(tmp_path: Path, corpus: Path) -> None:
    from jupyter_llm.display import RunsListing

    store = RunStore(tmp_path / "runs")
    good = store.create(Spec.from_dict(tiny_spec(corpus, name="good")))
    bad = store.create(Spec.from_dict(tiny_spec(corpus, name="bad")))
    text = (bad.path / "status.json").read_text()
    (bad.path / "status.json").write_text(text[: len(text) // 2])  # cut short, as by a crash
    gone = store.create(Spec.from_dict(tiny_spec(corpus, name="gone")))
    (gone.path / "status.json").unlink()

    assert bad.state == "damaged" and "status.json cannot be read" in bad.status()["error"]
    assert gone.state == "damaged" and "no status.json" in gone.status()["error"]
    assert good.state == "created"
    assert [r.id for r in jupyter_llm.runs(store.root)] == [good.id, bad.id, gone.id]
    listing = RunsListing(store.list())
    assert [r["state"] for r in listing.rows] == ["created", "damaged", "damaged"]
    done = cli("runs", root=store.root)
    assert done.returncode == 0, done.stderr
    assert (
        good.id in done.stdout
        and bad.id in done.stdout
        and "damaged: its status.json cannot be read" in done.stdout
    )
    rows = json.loads(cli("runs", "--json", root=store.root).stdout)
    assert [r["state"] for r in rows] == ["created", "damaged", "damaged"]
    with pytest.raises(UserError, match="cannot be resumed: damaged"):
        store.get(bad.id).resume()
    assert (bad.path / "spec.yaml").is_file()  # nothing of the folder was touched


def test_pipeline_parameters_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from jupyter_llm.pipeline import run

    pipeline = REPO / "notebooks" / "pipeline.yaml"
    out = tmp_path / "p"
    with pytest.raises(SpecError) as e:
        run(pipeline, ["max_steps=abc"], out=out)
    assert "-p max_steps" in str(e.value) and "02_train.ipynb has max_steps = 60 (an int)" in str(e.value)
    with pytest.raises(SpecError, match="no stage's parameters cell declares it"):
        run(pipeline, ["nosuchparam=1"], out=out)
    with pytest.raises(SpecError, match="give a float"):
        run(pipeline, ["lr=fast"], out=out)
    assert not out.exists()  # refused before the folder or the first stage
    done = cli("pipeline", "run", str(pipeline), "-p", "ranks=two", "--out", str(out))
    assert done.returncode == 2 and "ranks" in done.stderr and "give an int" in done.stderr


def test_pipeline_allow_extra_lets_an_unknown_parameter_through(tmp_path: Path) -> None:
    import nbformat

    from jupyter_llm.pipeline import run

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("steps = 3\n")
    cell.metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [cell, nbformat.v4.new_code_cell("assert isinstance(steps, int)\n")]
    nbformat.write(nb, tmp_path / "one.ipynb")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "one", "notebook": "one.ipynb"}]}))
    with pytest.raises(SpecError, match="declares it"):
        run(tmp_path / "p.yaml", ["extra=1"], out=tmp_path / "a")
    folder = run(tmp_path / "p.yaml", ["extra=1", "steps=5"], out=tmp_path / "b", allow_extra=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["state"] == "completed" and manifest["parameters"]["steps"] == 5


def _tmpfs(tmp_path: Path, size: str) -> Any:
    """A tmpfs of `size` (root only), unmounted afterwards."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    yield from _tmpfs(tmp_path, "4m")


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    yield from _tmpfs(tmp_path, "200m")


def test_a_launch_on_a_full_disk_says_so_and_leaves_nothing(tiny_disk: Path, corpus: Path) -> None:
    root = tiny_disk / "runs"
    root.mkdir()
    filler = tiny_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last block
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    spec_file = corpus.parent / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(corpus)))
    done = cli("train", str(spec_file), root=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"the disk holding {root} is full (0.0 MB free; cannot write a new run folder)" in done.stderr
    assert list(root.iterdir()) == []  # no half-made folder, no temporary files


@pytest.mark.deepspeed
def test_a_disk_that_fills_mid_run_fails_it_clearly_and_keeps_the_checkpoint(
    small_disk: Path, corpus: Path
) -> None:
    """The disk fills after the first checkpoint: the next one is refused before a byte is
    written, with the free space and what a checkpoint needs; no temporary files; the earlier
    checkpoint stays; a resume on the still-full disk refuses with the same sentence; once
    space is back the resume completes."""
    import os
    import shutil

    from conftest import wait_for
    from jupyter_llm import launch
    from jupyter_llm.errors import DiskFull

    run = launch(tiny_spec(corpus, name="full", train={"max_steps": 200, "save_every": 20, "log_every": 5,
                                                        "eval_every": 0}), root=small_disk / "runs")  # fmt: skip
    first = wait_for(lambda: run.checkpoints(), what="the first checkpoint")[0]
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave 4 MB: a checkpoint is refused below its size + 8 MB
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - (4 << 20))
    run.wait(300)
    st = run.status()
    assert st["state"] == "failed" and st["failure"]["cause"] == "disk_full", st
    assert re.search(rf"the disk holding {run.path}/checkpoints is full \([\d.]+ MB free, a checkpoint needs [\d.,]+ MB\)",
                     st["error"]), st["error"]  # fmt: skip
    assert run.checkpoints() == [first] and (first / "COMPLETE").is_file()
    assert not [p for p in run.path.rglob("*.tmp")]
    with pytest.raises(DiskFull, match=f"the disk holding {run.path}/checkpoints is full"):
        run.resume()
    filler.unlink()
    run.resume()
    assert run.wait(300) == "completed"
    assert [e for e in run.events() if e["event"] == "resumed_from"][-1]["step"] == 20


def test_cli_output_into_a_closed_pipe_and_ctrl_c_while_following(tmp_path: Path, corpus: Path) -> None:
    import os
    import signal

    from jupyter_llm.folder import State, write_status

    store = RunStore(tmp_path / "runs")
    store.create(Spec.from_dict(tiny_spec(corpus, name="chatty")))
    live = store.list()[0]
    (live.path / "logs" / "launcher.log").write_text("first line\n" + "x" * 100 + "\n" * 20_000)  # > a pipe
    done = subprocess.run(f"{sys.executable} -m jupyter_llm.cli --root {store.root} logs -n 20001 | head -c 100",
                          shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert len(done.stdout) == 100 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, (
        done.stderr
    )

    # it reads as running: its "supervisor" is this test process
    write_status(live.path, State.RUNNING, pid=os.getpid(), pid_create_time=None)
    (live.path / "logs" / "launcher.log").write_text("first line\n")
    follow = subprocess.Popen([sys.executable, "-m", "jupyter_llm.cli", "--root", str(store.root), "logs", "-f",
                               live.id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              # a terminal's Ctrl-C: SIGINT at its default in the child, whatever this
                              # process inherited (an ignored SIGINT is inherited, and Python keeps it)
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert follow.stdout is not None and follow.stdout.readline() == "first line\n"  # it is following now
    follow.send_signal(signal.SIGINT)
    _, err = follow.communicate(timeout=30)
    assert follow.returncode == 130 and "Traceback" not in err, err
    assert f"{live.id} goes on in the background (running); `jupyter-llm stop {live.id}` stops it" in err


def test_the_dry_run_fails_what_it_can_know_will_fail(corpus: Path, tmp_path: Path) -> None:
    from jupyter_llm.preflight import dry_run

    checks = {c.name: c for c in dry_run(Spec.from_dict(tiny_spec(corpus))).checks}
    assert checks["block vs data"].ok and checks["fits"].ok and "model" not in checks

    bad_model = tiny_spec(corpus, model={"task": "causal-lm", "config": {"model_type": "nonexistent"}})
    plan = dry_run(Spec.from_dict(bad_model))
    model = next(c for c in plan.checks if c.name == "model")
    assert not plan.ok and not model.ok and "nonexistent" in model.detail

    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question.\n" * 20)  # ~900 characters
    plan = dry_run(Spec.from_dict(tiny_spec(small, data={"block_size": 4096})), estimate_memory=False)
    block = next(c for c in plan.checks if c.name == "block vs data")
    assert not plan.ok and "longer than the whole training text (at most 774 tokens)" in block.detail

    # block 100000: 2.7 GB per rank at run time, where it sat in the step-0 validation for minutes
    f = tmp_path / "huge.yaml"
    f.write_text(yaml.safe_dump(tiny_spec(corpus, data={"block_size": 100_000})))
    done = cli("train", str(f), "--dry-run")
    assert done.returncode == 1 and "[FAIL] fits" in done.stdout, done.stdout[-2000:]


@pytest.mark.deepspeed
def test_a_killed_rank_is_restarted_automatically_and_a_bug_is_not(corpus: Path, monkeypatch: Any) -> None:
    """max_restarts 2: SIGKILL of rank 1 at a random step -> the run restarts by itself from
    its newest checkpoint and completes with restarts 1; the steps it runs again give the
    same losses as before the kill (a continuous curve) and the sample count goes on exactly.
    An exception in the loss is a user error: failed at once, no restart."""
    import os
    import random
    import signal

    from conftest import wait_for
    from jupyter_llm import launch

    kw: dict[str, Any] = {"max_steps": 120, "save_every": 20, "log_every": 5, "eval_every": 0,
                          "max_restarts": 2, "restart_backoff_s": 1}  # fmt: skip
    # each step takes >= 0.1 s and the kill comes at a log step 5 or 10 steps past a checkpoint:
    # it lands >= 1 s before the next checkpoint, so some steps are always run twice
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "step_delay_ms:100")
    run = launch(tiny_spec(corpus, name="restarts", train=kw))
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    kill_at = random.choice([25, 30, 45, 50, 65, 70])
    print("killing rank 1 at step", kill_at)
    wait_for(lambda: any(m.get("step", 0) >= kill_at for m in run.metrics()), what=f"step {kill_at}")
    rank1 = json.loads((run.path / "ranks" / "rank1.json").read_text())
    os.kill(rank1["pid"], signal.SIGKILL)
    assert run.wait(600) == "completed", run.status()
    st = run.status()
    assert (
        st["restarts"] == 1
        and st["attempt"] == 2
        and st["last_restart"]["class"].startswith("infrastructure")
    )
    restart = next(e for e in run.events() if e["event"] == "restarting")
    assert restart["failure"]["cause"] == "vanished" and restart["failure"]["rank"] == 1
    resumed = [e["step"] for e in run.events() if e["event"] == "resumed_from"]
    assert len(resumed) == 1 and resumed[0] % 20 == 0 and resumed[0] < kill_at + 5
    lines = [m for m in run.metrics(dedupe=False) if "loss" in m]
    first = {m["step"]: m["loss"] for m in lines if m["attempt"] == 1}
    second = {m["step"]: m["loss"] for m in lines if m["attempt"] == 2}
    assert min(second) == resumed[0] + 5 and max(second) == 120
    again = sorted(set(first) & set(second))
    assert again, "no step was logged by both attempts"
    for step in again:  # the steps between the checkpoint and the kill, run twice: the same losses
        assert second[step] == pytest.approx(first[step], rel=1e-5), step
    per_step = 8 * 2  # micro batch x ranks
    assert all(m["samples"] == m["step"] * per_step for m in lines)  # none seen twice, none skipped
    from jupyter_llm.summary import run_text

    assert "restarts: 1 automatic (last: rank 1 (pid" in run_text(run)  # Run.summary()
    shown = cli("status", run.id, root=run.path.parent)
    assert "restarts: 1" in shown.stdout and "last_restart: rank 1" in shown.stdout, shown.stdout

    monkeypatch.setenv("JUPYTER_LLM_FAULT", "raise_at_step:8")
    bug = launch(tiny_spec(corpus, name="bug", train=kw))
    assert bug.wait(300) == "failed"
    st = bug.status()
    assert st["restarts"] == 0 and st["attempt"] == 1 and "ZeroDivisionError" in st["error"]
    skipped = next(e for e in bug.events() if e["event"] == "not_restarted")
    assert skipped["class"].startswith("user error: ZeroDivisionError")
