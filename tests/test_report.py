"""report_to and the model card, on the shared real run (report_to every target, an `eval:`
section): each target's own reader finds what metrics.jsonl and eval.json say."""

from __future__ import annotations

import csv
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_spec, wait_for
from jupyter_llm import card, launch
from jupyter_llm.cli import main as cli
from jupyter_llm.errors import SpecError, UserError
from jupyter_llm.evaluation import Evaluation
from jupyter_llm.files import read_json
from jupyter_llm.runs import Run, RunStore
from jupyter_llm.spec import Spec


def reported(run: Run) -> dict[str, Any]:
    """Wait for the auto evaluation and for every target to have it and the run's end."""
    ev_id = wait_for(
        lambda: [e["eval_id"] for e in run.events() if e["event"] == "eval_started"], 60, "eval"
    )[0]
    ev = Evaluation(run.path / "evals" / ev_id)
    assert ev.wait(300) == "completed", "\n".join(ev.log_tail(30))

    def done() -> bool:
        states = [read_json(run.path / "reports" / f"{t}.json") or {} for t in run.spec.report_to]
        return all(s.get("finished") and ev_id in s.get("evals", []) for s in states)

    wait_for(done, 120, "every target to have the run and its evaluation", 0.5)
    return ev.result or {}


def train_losses(run: Run) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in run.metrics() if "loss" in m]


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history records of the offline W&B runs: the .wandb file is a LevelDB-style log of
    protobuf records (7-byte header, 32 KiB blocks, each chunk 4-byte CRC, 2-byte length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = f.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # a full record, or the last chunk of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                buf = b""
                if rec.WhichOneof("record_type") == "history":
                    out.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                    )
    return out


@pytest.mark.deepspeed
def test_every_target_has_the_runs_metrics_spec_and_evaluation(evaluated_run: Run) -> None:
    run = evaluated_run
    result = reported(run)
    losses = train_losses(run)
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]
    ppl = result["perplexity"]["ppl"]
    # TensorBoard's reader: every run of the runs root by its id, the same loss values (float32)
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(run.path.parent))
    mux.Reload()
    assert f"{run.id}/tensorboard" in mux.Runs()
    tb = tensorboard_scalars(run.path / "tensorboard", "train/loss")
    assert [s for s, _ in tb] == [s for s, _ in losses]
    assert [v for _, v in tb] == pytest.approx([v for _, v in losses], rel=1e-6)
    val = [(m["step"], m["val_loss"]) for m in run.metrics() if "val_loss" in m]
    assert tensorboard_scalars(run.path / "tensorboard", "val/loss") == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in val
    ]
    # (the other tests of this shared run add evaluations of their own: this one is among them)
    assert (30, pytest.approx(ppl, rel=1e-6)) in tensorboard_scalars(
        run.path / "tensorboard", "eval/perplexity"
    )
    # MLflow's client: the run, its parameters, every metric point, the evaluation, the artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.path.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jupyter-llm")
    [ml] = client.search_runs([exp.experiment_id], filter_string=f"tags.`jupyter_llm.run_id` = '{run.id}'")
    assert ml.info.status == "FINISHED" and ml.info.run_name == "evaluated"
    assert ml.data.params["optim.lr"] == "0.003" and ml.data.params["train.max_steps"] == "30"
    assert ml.data.params["distributed.procs_per_node"] == "2"
    history = client.get_metric_history(ml.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == losses  # float64 in SQLite: exact
    assert (30, ppl) in [
        (p.step, p.value) for p in client.get_metric_history(ml.info.run_id, "eval/perplexity")
    ]
    artifacts = {a.path for a in client.list_artifacts(ml.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/README.md"} <= artifacts, artifacts
    ev_id = result["eval_id"]
    assert [a.path for a in client.list_artifacts(ml.info.run_id, f"evals/{ev_id}")] == [
        f"evals/{ev_id}/eval.json"
    ]
    # W&B, offline: its own record file holds the same losses, by step
    wb = [h for h in wandb_history(run.path) if "train/loss" in h]
    assert [(h["_step"], h["train/loss"]) for h in wb] == losses
    # CSV: a row per logged line
    rows = list(csv.DictReader((run.path / "reports" / "metrics.csv").open()))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]] == losses
    assert pytest.approx(ppl) in [float(r["eval/perplexity"]) for r in rows if r.get("eval/perplexity")]
    # the follower is gone once the run ended (it does not outlive what it reports)
    import psutil

    [started] = [e for e in run.events() if e["event"] == "report_started"]
    wait_for(lambda: not psutil.pid_exists(started["pid"]), 30, "the report follower to exit")
    assert not [e for e in run.events() if e["event"] == "report_error"]


@pytest.mark.deepspeed
def test_the_model_card_carries_the_evaluation_and_the_folder_still_loads(
    evaluated_run: Run, ip: Any, monkeypatch: Any
) -> None:
    run = evaluated_run
    reported(run)
    # the card carries the newest evaluation of the final model (other tests add some)
    result = [e.result for e in run.evaluations() if e.result and e.result["checkpoint"] == "final"][-1]
    meta = card.read(run)
    assert (
        meta is not None
        and meta["library_name"] == "transformers"
        and meta["pipeline_tag"] == "text-generation"
    )
    assert "base_model" not in meta  # trained from scratch
    assert meta["datasets"] == ["corpus.txt"] and "jupyter-llm" in meta["tags"]
    [entry] = meta["model-index"]
    [res] = entry["results"]
    assert (
        res["dataset"]["revision"]
        == "sha256:" + read_json(run.path / "manifest.json")["data_files"][run.spec.data.train[0]]
    )
    metrics = {m["type"]: m["value"] for m in res["metrics"]}
    assert metrics["perplexity"] == pytest.approx(result["perplexity"]["ppl"], rel=1e-6)
    text = run.model_card or ""
    for part in ("## Training data", "## Evaluation", "## Training procedure", "## Training curve",
                 "## Framework versions", "## How to use", "AutoModelForCausalLM", "| 30 |"):  # fmt: skip
        assert part in text, part
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.final_model)  # the card beside the weights harms nothing
    assert card.param_count(run.path / "final") == sum(p.numel() for p in model.parameters())
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters" in text
    # %llm_status shows it for the completed run
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(run.path.parent.parent))
    out = ip.run_line_magic("llm_status", run.id)
    assert "Model card" in out.data and "perplexity" in out.data


@pytest.mark.deepspeed
def test_cli_report_sends_a_finished_run_to_a_target_again(evaluated_run: Run, capsys: Any) -> None:
    run = evaluated_run
    reported(run)
    root = str(run.path.parent)
    # nothing twice: the target has everything already
    assert cli(["--root", root, "report", run.id, "--to", "csv"]) == 0
    assert "csv: 0 new metric line(s)" in capsys.readouterr().out
    # a target started over: everything again, once
    shutil.rmtree(run.path / "tensorboard")
    (run.path / "reports" / "tensorboard.json").unlink()
    assert cli(["--root", root, "report", run.id, "--to", "tensorboard"]) == 0
    out = capsys.readouterr().out
    assert (
        f"tensorboard: {len(run.metrics(dedupe=False))} new metric line(s)" in out
        and f"tensorboard --logdir {root}" in out
    )
    assert tensorboard_scalars(run.path / "tensorboard", "train/loss") == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in train_losses(run)
    ]
    assert cli(["--root", root, "report", run.id, "--to", "tensorbord"]) == 2
    assert (
        "unknown report target(s) ['tensorbord']: choose from tensorboard, mlflow, wandb, csv"
        in capsys.readouterr().err
    )


def test_a_missing_client_is_an_error_at_launch(corpus: Path, monkeypatch: Any) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    root = corpus.parent / "runs"
    with pytest.raises(
        UserError, match=r"report_to mlflow needs mlflow: pip install 'jupyter-llm\[mlflow\]'"
    ):
        launch(tiny_spec(corpus, report_to=["csv", "mlflow"]), root=root)
    assert RunStore(root).list() == []  # nothing written, nothing started
    with pytest.raises(SpecError, match="report_to"):
        Spec.from_dict(tiny_spec(corpus, report_to=["tensorbord"]))
    assert Spec.from_dict(tiny_spec(corpus, report_to="tensorboard,csv")).report_to == ["tensorboard", "csv"]
    assert Spec.from_dict(tiny_spec(corpus, report_to="none")).report_to == []
