"""The CLI as a user meets it: real subprocesses, exit codes, one-paragraph errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "jupyter-llm"), *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_help_everywhere() -> None:
    for verb in ([], ["train"], ["prepare"], ["runs"], ["status"], ["logs"], ["stop"], ["resume"]):
        out = cli(*verb, "--help")
        assert out.returncode == 0 and "usage: jupyter-llm" in out.stdout


def test_jupyter_llm_subcommand() -> None:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([str(BIN / "jupyter"), "llm", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "train" in out.stdout


def test_bad_spec_exit_2(tmp_path: Path, corpus: Path) -> None:
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump({"data": {"train": str(corpus)}, "distributed": {"zero_stage": 4}}))
    out = cli("train", str(f))
    assert out.returncode == 2
    assert "distributed.zero_stage" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", str(f), "--set", "distributed.zero_stage=3", "--set", "optim.lr=-1")
    assert out.returncode == 2 and "optim.lr" in out.stderr and "zero_stage" not in out.stderr
    assert cli("runs", "--json").stdout.strip() == "[]"  # nothing was created


def test_missing_spec_file_and_unknown_run(tmp_path: Path) -> None:
    out = cli("train", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr
    for verb in ("status", "logs", "stop", "resume"):
        out = cli(verb, "no-such-run")
        assert out.returncode == 2 and "no run" in out.stderr, verb
    out = cli("status")
    assert out.returncode == 2 and "no runs" in out.stderr


def test_dry_run_prints_config(tmp_path: Path, corpus: Path) -> None:
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump({"data": {"train": str(corpus)}}))
    out = cli("train", str(f), "--dry-run", "--set", "distributed.zero_stage=3")
    assert out.returncode == 0
    text = out.stdout
    cfg = json.loads(text[text.index("deepspeed config:\n") + 18 : text.index("\ncommand")])
    assert cfg["zero_optimization"]["stage"] == 3
    assert cli("runs", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("verb", ["stop", "resume"])
def test_actions_on_created_run_are_refused(verb: str, corpus: Path) -> None:
    from jupyter_llm.runs import RunStore
    from jupyter_llm.spec import Spec

    run = RunStore().create(Spec.from_dict({"data": {"train": str(corpus)}}))
    out = cli(verb, run.id)
    assert out.returncode == 2 and run.id in out.stderr
