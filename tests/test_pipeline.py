"""Papermill pipelines for real: notebooks/pipeline.yaml (prepare → train → evaluate) on real
kernels and a real DeepSpeed run; a failing stage, --resume, and reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO
from jupyter_llm.cli import main as cli
from jupyter_llm.errors import SpecError, UserError
from jupyter_llm.files import read_json
from jupyter_llm.pipeline import PipelineError, load, parse_params, run
from jupyter_llm.runs import RunStore

PIPELINE = REPO / "notebooks" / "pipeline.yaml"
TINY = {"max_steps": 20, "ranks": 1}


@pytest.mark.deepspeed
def test_pipeline_fails_resumes_hands_off_and_reproduces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pipe"
    # the evaluate stage is forced to fail (max_new_tokens must be at least 1)
    with pytest.raises(PipelineError) as e:
        run(PIPELINE, {**TINY, "max_new_tokens": 0}, out=out)
    msg = str(e.value)
    assert "stage evaluate failed in cell" in msg and "max_new_tokens" in msg and "03_evaluate.ipynb" in msg
    m = read_json(out / "manifest.json")
    assert m is not None and m["state"] == "failed"
    assert [m["stages"][s]["state"] for s in ("prepare", "train", "evaluate")] == [
        "completed",
        "completed",
        "failed",
    ]
    failed_nb = json.loads((out / "03_evaluate.ipynb").read_text())
    assert any(o.get("output_type") == "error" for c in failed_nb["cells"] for o in c.get("outputs", []))
    done_before = {s: m["stages"][s]["ended_at"] for s in ("prepare", "train")}
    # --resume with a fixed parameter continues from the failed stage only
    assert cli(["pipeline", "run", str(PIPELINE), "--resume", str(out), "-p", "max_new_tokens=8"]) == 0
    m = read_json(out / "manifest.json")
    assert m is not None and m["state"] == "completed" and m["parameters"]["max_new_tokens"] == 8
    assert {s: m["stages"][s]["ended_at"] for s in ("prepare", "train")} == done_before  # not rerun
    outs = {s: m["stages"][s]["outputs"] for s in ("prepare", "train", "evaluate")}
    # hand-offs: train started from the prepare run's spec (a cache hit); evaluate evaluated the
    # model the train stage produced
    store = RunStore(m["runs_root"])
    prep, train = store.get(outs["prepare"]["prepare_run"]), store.get(outs["train"]["train_run"])
    assert train.spec.data == prep.spec.data and train.spec.tokenizer == prep.spec.tokenizer
    assert next(e for e in train.events() if e["event"] == "data_ready")["cached"] is True
    assert outs["evaluate"]["evaluated_run"] == train.id
    # every run a stage launched links back to the pipeline and the stage (the sidebar groups by it)
    assert read_json(train.path / "pipeline.json") == {"pipeline": str(out), "stage": "train"}
    assert read_json(prep.path / "pipeline.json") == {"pipeline": str(out), "stage": "prepare"}
    result = json.loads(Path(outs["evaluate"]["eval_json"]).read_text())
    assert result["checkpoint"] == "final" and result["perplexity"]["ppl"] == outs["evaluate"]["perplexity"]
    assert str(train.final_model) == outs["train"]["final_model"]
    # the manifest records what reproduces it
    assert m["versions"]["torch"] and m["inputs"][str(PIPELINE)] and set(m["inputs"]) >= {"02_train.ipynb"}
    assert (out / "summary.json").is_file() and all((out / f"0{i}_{s}.ipynb").is_file()
                                                    for i, s in enumerate(("prepare", "train", "evaluate"), 1))  # fmt: skip
    # reproduce the CPU training run from its record: the same loss curve, exactly
    capsys.readouterr()
    assert cli(["--root", m["runs_root"], "reproduce", train.id]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["equal"] is True and res["max_abs_diff"] == 0.0 and res["new"] != train.id


def test_bad_pipelines_are_named(tmp_path: Path) -> None:
    def bad(doc: dict[str, Any]) -> str:
        f = tmp_path / "p.yaml"
        f.write_text(yaml.safe_dump(doc))
        with pytest.raises(SpecError) as e:
            load(f)
        return str(e.value)

    (tmp_path / "a.ipynb").write_text("{}")
    assert "not found" in bad({"stages": [{"name": "a", "notebook": "missing.ipynb"}]})
    assert "EARLIER_STAGE.output" in bad(
        {"stages": [{"name": "a", "notebook": "a.ipynb", "inputs": {"x": "b.y"}}]}
    )
    assert "two stages" in bad(
        {"stages": [{"name": "a", "notebook": "a.ipynb"}, {"name": "a", "notebook": "a.ipynb"}]}
    )
    assert "at least one stage" in bad({"stages": []})
    assert "unknown key" in bad({"stages": [{"name": "a", "notebook": "a.ipynb", "params": {}}]})
    with pytest.raises(UserError, match="key=value"):
        parse_params(["max_steps"])
    assert parse_params(["a=1", "b=[x, y]", "c="]) == {"a": 1, "b": ["x", "y"], "c": ""}
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        run(PIPELINE, out=tmp_path / "busy")


@pytest.mark.deepspeed
def test_quickstart_runs_under_papermill_with_tiny_parameters(tmp_path: Path) -> None:
    import papermill as pm

    out = tmp_path / "quickstart.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "quickstart.ipynb"), str(out), parameters={"max_steps": 20, "ranks": 1},
                        cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)  # fmt: skip
    run = RunStore().get("quickstart")
    assert (
        run.state == "completed"
        and run.spec.train.max_steps == 20
        and run.spec.distributed.procs_per_node == 1
    )
    assert max(m["step"] for m in run.metrics()) == 20


def test_pipeline_magic_names_a_missing_file(ip: Any) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="pipeline file not found"):
        ip.run_line_magic("llm_pipeline", "missing.yaml")


def test_pipeline_run_on_a_terminal_shows_each_stages_progress_and_no_kernel_warning(tmp_path: Path) -> None:
    """`jupyter-llm pipeline run` with stderr on a pty: papermill's bar of the stage's cells;
    the kernel runs over IPC, so ipykernel's "running over TCP without encryption" never shows."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import subprocess
    import sys
    import termios

    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("total = n + 1"),
                                         nbformat.v4.new_code_cell("print(total)")])  # fmt: skip
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "one.ipynb")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "one", "notebook": "one.ipynb"}]}))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_llm.cli", "pipeline", "run", str(tmp_path / "p.yaml"),
                             "-p", "n=41", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=slave, text=True)  # fmt: skip
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    summary, _ = proc.communicate(timeout=300)
    os.close(master)
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "stage one: one.ipynb" in text and "one" in summary
    assert re.search(r"Executing: +100%.*4/4", text), text[-2000:]  # papermill's own bar: every cell
    assert "without encryption" not in text and "unknown parameter" not in text  # no warning not ours
    executed = nbformat.read(tmp_path / "out" / "01_one.ipynb", 4)
    assert executed.cells[-1].outputs[0]["text"] == "42\n"
