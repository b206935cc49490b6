"""The magics through IPython's real shell: every error path, and the success paths that
start nothing (dry runs, listings, attach). Real launches from a kernel: test_kernel.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from IPython.core.error import UsageError

from jupyter_llm.files import write_json_atomic
from jupyter_llm.preflight import DryRun
from jupyter_llm.runs import Run, RunStore
from jupyter_llm.spec import Spec


@pytest.fixture
def body(corpus: Path) -> str:
    return yaml.safe_dump({"data": {"train": str(corpus)}, "train": {"max_steps": 10}})


def line(ip: Any, magic: str, arg: str = "") -> Any:
    return ip.run_line_magic(magic, arg)


def test_magics_registered(ip: Any) -> None:
    magics = ip.magics_manager.magics
    for name in ("llm_train", "llm_runs", "llm_status", "llm_logs", "llm_stop", "llm_resume", "llm_attach"):
        assert name in magics["line"], name
    assert (
        "llm_train" in magics["cell"] and "llm_prepare" in magics["cell"] and "llm_prepare" in magics["line"]
    )


@pytest.mark.parametrize(
    "magic,arg,message",
    [
        ("llm_train", "", "give a spec"),
        ("llm_train", "no_such_variable", "neither a variable"),
        ("llm_train", "missing/spec.yaml", "not found"),
        ("llm_train", "--from nope", "no run"),
        ("llm_train", "--bogus", "unrecognized arguments"),
        ("llm_train", "'unbalanced", "could not parse"),
        ("llm_status", "", "no runs"),
        ("llm_status", "../../etc", "not a run id"),
        ("llm_logs", "--rank x", "invalid int"),
        ("llm_logs", "", "no runs"),
        ("llm_stop", "", "no runs"),
        ("llm_resume", "", "no runs"),
        ("llm_attach", "nope", "no run"),
    ],
)
def test_line_errors_are_usage_errors(ip: Any, magic: str, arg: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        line(ip, magic, arg)


def test_spec_errors_show_as_a_table(ip: Any, corpus: Path) -> None:
    cell = f"data: {{train: {corpus}}}\ndistributed: {{zero_stage: 9}}\noptim: {{lr: -1, typo: 1}}\n"
    with pytest.raises(UsageError) as err:
        ip.run_cell_magic("llm_train", "", cell)
    text = str(err.value)
    rows = text.splitlines()[1:]
    assert len(rows) == 3 and "Traceback" not in text
    assert any(r.split()[0] == "distributed.zero_stage" and "0, 1, 2, 3 or 'auto'" in r for r in rows)
    assert any(r.split()[0] == "optim.typo" and "allowed: name, lr" in r for r in rows)
    assert RunStore().list() == []
    with pytest.raises(UsageError, match="not valid YAML"):
        ip.run_cell_magic("llm_train", "", "data: [unclosed")
    with pytest.raises(UsageError, match="--from RUN, not both"):
        ip.run_cell_magic("llm_train", "--from x", cell)


def test_variable_of_wrong_type(ip: Any) -> None:
    ip.user_ns["not_a_spec"] = 42
    with pytest.raises(UsageError, match="is a int"):
        line(ip, "llm_train", "not_a_spec")


def test_dry_run_from_cell_shows_plan(ip: Any, body: str) -> None:
    d = ip.run_cell_magic(
        "llm_train", "mydry --dry-run --set distributed.zero_stage=3 --set distributed.procs_per_node=2", body
    )
    assert isinstance(d, DryRun) and d.ok
    assert d.spec.name == "mydry" and d.ds_config["zero_optimization"]["stage"] == 3
    assert "--ranks=2" in d.command and d.ranks == 2
    names = {c.name for c in d.checks}
    assert {"master port", "deepspeed importable", "data file", "ranks"} <= names
    assert d.memory is not None and d.memory["params"] > 0
    assert set(d.memory["per_rank_gib"]) == {"0", "1-2", "3"}
    html = ip.display_formatter.formatters["text/html"].lookup(d)(d)  # registered by the extension
    assert "ZeRO 3" in html and "Command (2 rank(s))" in html and "jupyter_llm.launcher.ranks" in html
    assert RunStore().list() == []  # a dry run starts nothing


def test_spec_from_variable_path_and_clone(ip: Any, corpus: Path, tmp_path: Path) -> None:
    spec_dict = {"name": "fromdict", "data": {"train": str(corpus)}}
    ip.user_ns["my_spec"] = spec_dict
    ip.user_ns["my_spec_obj"] = Spec.from_dict({**spec_dict, "name": "fromobj"})
    assert line(ip, "llm_train", "my_spec --dry-run --set seed=5").spec.seed == 5
    assert line(ip, "llm_train", "my_spec_obj --dry-run").spec.name == "fromobj"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "fromfile", "data": {"train": corpus.name}}))  # relative to the file
    ip.run_line_magic("cd", str(Path.home()))
    assert line(ip, "llm_train", f"{f} --dry-run").spec.name == "fromfile"
    earlier = RunStore().create(Spec.from_dict({**spec_dict, "name": "earlier", "optim": {"lr": 0.01}}))
    clone = line(ip, "llm_train", f"--from {earlier.id} --dry-run --set optim.lr=0.02")
    assert clone.spec.name == "earlier" and clone.spec.optim.lr == 0.02


def test_runs_status_logs_attach(ip: Any, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = RunStore().create(Spec.from_dict({"name": "listed", "data": {"train": str(corpus)}}))
    (run.path / "logs" / "rank0.log").write_text("".join(f"line {i}\n" for i in range(100)))
    with open(run.path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 10, "time": 1.0, "loss": 3.5}) + "\n")
    table = line(ip, "llm_runs")
    assert "listed" in repr(table) and run.id in table._repr_html_() and "3.5000" in repr(table)
    status = line(ip, "llm_status", run.id)
    assert run.id in status.data and "step 10/" in status.data
    line(ip, "llm_logs", "listed -n 3 --rank 0")
    assert capsys.readouterr().out.split() == ["line", "97", "line", "98", "line", "99"]
    attached = line(ip, "llm_attach", "listed")
    assert isinstance(attached, Run) and attached == run
    with pytest.raises(UsageError, match="never started"):
        line(ip, "llm_stop", run.id)
    st = json.loads((run.path / "status.json").read_text())
    write_json_atomic(run.path / "status.json", {**st, "state": "completed"})
    with pytest.raises(UsageError, match="already completed"):
        line(ip, "llm_resume", run.id)
    assert line(ip, "llm_stop", run.id).endswith("completed")
