"""Hyperparameter sweeps: the sweep file's validation, the live view, and a real Optuna sweep
of 6 trials (each a 1-rank DeepSpeed run, 2 at once) with pruning, a failing trial, a killed
and resumed controller, and the best trial launched as a full run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import tiny_spec, wait_for
from jupyter_llm.cli import main as cli
from jupyter_llm.errors import SpecError
from jupyter_llm.files import process_alive, read_json, write_json_atomic
from jupyter_llm.runs import RunStore
from jupyter_llm.sweep import Sweep, get_sweep, load_sweep_spec, sweep
from jupyter_llm.widgets.sweep_view import SweepView


def base(corpus: Path, **sections: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "distributed": {"procs_per_node": 1, "zero_stage": 2},
        "train": {"max_steps": 40, "log_every": 5, "eval_every": 10, "eval_batches": 2, "save_every": 0,
                  "stop_grace_s": 60},
        "optim": {"lr": 3e-3, "min_lr": 1e-6, "warmup_steps": 2},
    }  # fmt: skip
    spec = tiny_spec(corpus, **{**defaults, **sections})
    spec.pop("name")
    return spec


def gone(procs: list[tuple[Any, Any]], timeout: float = 20) -> None:
    """These processes end (a job writes its final state just before it exits)."""
    wait_for(lambda: not [p for p in procs if process_alive(*p)], timeout, f"{procs} to end")


def problems(source: Any) -> str:
    with pytest.raises(SpecError) as e:
        load_sweep_spec(source)
    return str(e.value)


def test_bad_sweeps_are_named(corpus: Path, tmp_path: Path) -> None:
    b = base(corpus)
    assert "space" in problems({"base": b, "space": {}})
    assert "exactly one of" in problems(
        {"base": b, "space": {"optim.lr": {"uniform": [0, 1], "int": [0, 1]}}}
    )
    assert "positive" in problems({"base": b, "space": {"optim.lr": {"loguniform": [0, 1e-2]}}})
    assert "low bound" in problems({"base": b, "space": {"optim.lr": {"uniform": [1, 0.1]}}})
    msg = problems({"base": b, "space": {"optim.learning_rate": {"uniform": [0.1, 1]}}})
    assert "space: optim.learning_rate" in msg and "unknown key" in msg
    msg = problems({"base": {**b, "optim": {"lr": -1}}, "space": {"optim.lr": {"uniform": [0.1, 1]}}})
    assert "base.optim.lr" in msg
    cores = os.cpu_count() or 1
    msg = problems({"base": base(corpus, distributed={"procs_per_node": 2}), "parallel": cores,
                    "space": {"optim.lr": {"uniform": [1e-4, 1e-3]}}})  # fmt: skip
    assert "oversubscribe" in msg
    assert "keys not in space" in problems({"base": b, "space": {"optim.lr": {"uniform": [1e-4, 1e-3]}},
                                            "enqueue": [{"optim.min_lr": 1e-5}]})  # fmt: skip
    assert "needs base.eval" in problems({"base": b, "space": {"optim.lr": {"uniform": [1e-4, 1e-3]}},
                                          "objective": {"metric": "eval.perplexity.ppl"}})  # fmt: skip
    assert "not valid YAML" in problems("base: [1\nspace: {}\n")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": b, "space": {"optim.lr": {"uniform": [1e-4, 1e-3]}}, "trials": 0}))
    assert "trials" in problems(f)


def test_sweep_view_from_the_controller_snapshot(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The view reads trials.json alone: table, history with best-so-far, the best spec."""
    sw_spec, _ = load_sweep_spec(
        {"name": "v", "base": base(corpus), "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    )
    path = Path(os.environ["JUPYTER_LLM_HOME"]) / "runs" / "_sweeps" / "20260101-000000-000-v"
    path.mkdir(parents=True)
    (path / "sweep.yaml").write_text(yaml.safe_dump(sw_spec.model_dump(mode="json")))
    write_json_atomic(path / "status.json", {"state": "completed"})
    trials = [{"number": i, "state": s, "params": {"optim.lr": lr}, "value": v, "run_id": None, "error": e,
               "pruned_at_step": p, "intermediate": {}}
              for i, (s, lr, v, e, p) in enumerate([("COMPLETE", 1e-3, 2.5, None, None), ("COMPLETE", 3e-3, 2.1, None, None),
                                                   ("PRUNED", 1e-4, None, None, 10), ("FAIL", 5e-3, None, "boom", None),
                                                   ("COMPLETE", 2e-3, 2.3, None, None)])]  # fmt: skip
    write_json_atomic(path / "trials.json", {"trials": trials})
    sw = get_sweep("v")
    assert sw.best()["number"] == 1 and sw.best_spec().optim.lr == 3e-3
    view = SweepView(sw)
    assert list(view.points.x) == [0, 1, 4] and list(view.best_line.y) == [2.5, 2.1, 2.1]
    assert "pruned at step 10" in view.table.value and "boom" in view.table.value
    assert "trial 1" in view.best_html.value and not view.launch_button.disabled
    assert "complete 3" in view.header.value and "best: trial 1" in view._repr_mimebundle_()["text/plain"]
    view.close()
    assert cli(["--root", str(path.parent.parent), "sweep", "--status", "v"]) == 0
    assert "best: trial 1" in capsys.readouterr().out


@pytest.mark.deepspeed
def test_real_sweep_prunes_fails_resumes_and_cleans_up(corpus: Path, ip: Any, monkeypatch: Any) -> None:
    # every step of every trial takes >= 0.2 s (fault injection), so the pruned trial still has
    # 30 steps (>= 6 s) to go when it is pruned at step 10: its stop never races its end
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "step_delay_ms:200")
    body = {
        "base": base(corpus),
        "space": {"optim.lr": {"loguniform": [1e-6, 1e-2]}, "model.config.n_head": {"choice": [2, 3, 4]}},
        "objective": {"metric": "val_loss", "direction": "minimize", "at": "end"},
        "trials": 6, "parallel": 2, "seed": 7,
        "pruner": {"kind": "median", "startup_trials": 2, "warmup_steps": 5},
        # two good trials first; then one that cannot learn (pruned), one that cannot build its
        # model (32 dims do not split into 3 heads: the rank fails), then two sampled ones
        "enqueue": [{"optim.lr": 3e-3, "model.config.n_head": 2}, {"optim.lr": 2e-3, "model.config.n_head": 2},
                    {"optim.lr": 1e-6, "model.config.n_head": 2}, {"optim.lr": 3e-3, "model.config.n_head": 3}],
    }  # fmt: skip
    sw = ip.run_cell_magic("llm_sweep", "lrs", yaml.safe_dump(body))
    assert isinstance(sw, Sweep) and sw.spec.name == "lrs"

    def trial_states() -> dict[int, str]:
        return {t["number"]: t["state"] for t in sw.trials()}

    # kill the controller once two trials have finished; the trial runs go on without it
    wait_for(
        lambda: sum(s == "COMPLETE" for s in trial_states().values()) >= 2, 600, "two complete trials", 0.5
    )
    before = {t["number"]: t["value"] for t in sw.trials() if t["state"] == "COMPLETE"}
    assert len(before) >= 2, sw.trials()
    os.kill(sw.status()["pid"], signal.SIGKILL)
    wait_for(lambda: sw.status().get("lost"), 10, "the killed controller to read as lost")
    assert sw.state == "failed" and sw.status()["lost"]
    sw.resume()
    assert sw.wait(900) == "completed", sw.summary() + (sw.path / "controller.log").read_text()[-3000:]
    trials = sw.trials()
    by = {t["number"]: t for t in trials}
    # nothing finished before the kill was lost or rerun
    assert {n: by[n]["value"] for n in before} == before
    assert len(trials) == 6 and len({t["run_id"] for t in trials}) == 6
    assert by[0]["state"] == by[1]["state"] == "COMPLETE"
    # the trial that could not learn was pruned early and stopped gracefully; nothing of it kept
    assert by[2]["state"] == "PRUNED" and by[2]["pruned_at_step"] < 40, by[2]
    pruned = RunStore(sw.store.root).get(by[2]["run_id"])
    assert pruned.state == "stopped" and max(m["step"] for m in pruned.metrics()) < 40
    assert not (pruned.path / "checkpoints").exists()
    # the trial whose model cannot be built is recorded failed, and the study went on
    assert by[3]["state"] == "FAIL" and "rank 0 failed" in by[3]["error"], by[3]
    # the best trial is the best of the study, and its value is its run's last val_loss
    done = [t for t in trials if t["state"] == "COMPLETE"]
    best = sw.best()
    assert best is not None and best["value"] == min(t["value"] for t in done)
    best_run = sw.store.get(best["run_id"])
    assert best["value"] == [m["val_loss"] for m in best_run.metrics() if "val_loss" in m][-1]
    assert json.loads((best_run.path / "sweep.json").read_text())["trial"] == best["number"]
    # no process, port or stray checkpoint left behind
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    for r in sw.runs():
        st = r.status()
        assert st["state"] in ("completed", "failed", "stopped")
        procs = [(st.get("pid"), st.get("pid_create_time"))] + [
            (i["pid"], i.get("create_time"))
            for f in (r.path / "ranks").glob("rank*.json")
            if (i := read_json(f))
        ]
        gone(procs)
        if st.get("master_port"):  # nobody listens on the trial's master port any more
            assert st["master_port"] not in listening, (r.id, st["master_port"])
        assert not r.checkpoints()
    gone([(sw.status()["pid"], sw.status()["pid_create_time"])])  # the controller too
    # the view's "Launch best as full run" starts the best spec (with overrides) as a new run
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    view = SweepView(sw)
    run = view.launch_best()
    assert run is not None and run.spec.optim.lr == best["params"]["optim.lr"]
    assert run.spec.model.config["n_head"] == best["params"]["model.config.n_head"]
    assert run.wait(600) == "completed"
    view.close()


@pytest.mark.deepspeed
def test_sweep_on_an_evaluation_metric_within_a_time_budget(corpus: Path) -> None:
    """Objective eval.perplexity.ppl: each trial's value is its automatic evaluation's; the
    time budget stops new trials (2 start at once, none after)."""
    spec = base(corpus, train={"max_steps": 20, "log_every": 5, "eval_every": 0, "save_every": 0},
                eval={"max_blocks": 4}, report_to=["mlflow"])  # fmt: skip
    sw = sweep({"name": "ppl", "base": spec, "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
                "objective": {"metric": "eval.perplexity.ppl"}, "trials": 50, "parallel": 2, "budget_s": 3,
                "pruner": {"kind": "none"}}, wait=True, timeout=900)  # fmt: skip
    assert sw.state == "completed", sw.summary()
    trials = sw.trials()
    assert len(trials) == 2 and all(t["state"] == "COMPLETE" for t in trials), trials
    for t in trials:
        result = read_json(sw.store.get(t["run_id"]).path / "eval.json")
        assert result is not None and t["value"] == result["perplexity"]["ppl"]
        assert result["perplexity"]["blocks"] == 4
    # report_to mlflow: the sweep is a parent MLflow run, each trial's run nested under it
    from mlflow.tracking import MlflowClient

    runs = [sw.store.get(t["run_id"]) for t in trials]
    for r in runs:
        wait_for(
            lambda r=r: (read_json(r.path / "reports" / "mlflow.json") or {}).get("evals"), 120, "the reports"
        )
    client = MlflowClient(f"sqlite:///{sw.store.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jupyter-llm").experiment_id
    [parent] = client.search_runs([exp], filter_string=f"tags.`jupyter_llm.sweep_id` = '{sw.id}'")
    nested = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(n.data.tags["jupyter_llm.run_id"] for n in nested) == sorted(r.id for r in runs)
    for n in nested:
        t = next(t for t in trials if t["run_id"] == n.data.tags["jupyter_llm.run_id"])
        assert n.data.metrics["eval/perplexity"] == t["value"] and n.data.params["optim.lr"] == str(
            t["params"]["optim.lr"]
        )
