"""`report_to`: a run's metrics, its spec and its evaluations in TensorBoard, MLflow, W&B or CSV.

The exporters read the run folder, never the ranks, so the worker stays what it is and a run
on another machine reports from here. The supervisor starts a follower for a run whose spec has
`report_to` (`python -m jupyter_llm.report RUN --follow`, its output in logs/report.log); an
evaluation reports its result when it completes; `jupyter-llm report RUN --to …` (or
`report(run, to=[…])`) does the same for any run, once. What each target has received is in
`reports/<target>.json`, so a report continues where the last one stopped: no point twice.

- tensorboard: event files in `<run>/tensorboard/`; `%tensorboard --logdir <runs root>` shows
  every run side by side, named by its id.
- mlflow: one MLflow run per run (a sweep's trials nested under a parent run), the flattened
  spec as parameters, every metric point, the evaluations, and the final model, its card and
  eval.json as artifacts. Default store: `sqlite:///<runs root>/mlflow.db`.
- wandb: offline unless `report.wandb_mode: online`; `wandb sync <run>/wandb` uploads later.
- csv: `<run>/reports/metrics.csv`, one row per logged step.

Tags are the metric names with their group: train/loss, train/lr, val/loss, eval/perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import now_iso, read_json, write_json_atomic
from .folder import (
    EVALS_DIR,
    FINAL_DIR,
    LOGS_DIR,
    METRICS_FILE,
    REPORTS_DIR,
    STATUS_FILE,
    TENSORBOARD_DIR,
    Event,
    RunFolder,
    State,
    record_event,
)
from .spec import REPORT_TARGETS, Spec
from .summary import eval_numbers

# target -> (modules it imports, the extra that installs them)
NEEDS = {"tensorboard": (("tensorboardX",), "tensorboard"), "mlflow": (("mlflow",), "mlflow"),
         "wandb": (("wandb",), "wandb"), "csv": ((), "")}  # fmt: skip
SKIP_KEYS = {"step", "time", "attempt", "peak_flops"}
POLL_S = 2.0
LOCK_WAIT_S = 120.0


def missing_packages(targets: list[str]) -> list[str]:
    """One sentence per target whose package is not installed, naming the extra to install."""
    out = []
    for t in targets:
        mods, extra = NEEDS[t]
        absent = [m for m in mods if importlib.util.find_spec(m) is None]
        if absent:
            out.append(f"report_to {t} needs {', '.join(absent)}: pip install 'jupyter-llm[{extra}]'")
    return out


def check_installed(targets: list[str]) -> None:
    if problems := missing_packages(targets):
        raise UserError("; ".join(problems))


def tag(key: str) -> str:
    """metrics.jsonl's key as a grouped tag: loss -> train/loss, val_loss -> val/loss."""
    return "val/" + key[4:] if key.startswith("val_") else "train/" + key


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics line's numbers, by tag (lists, strings and None left out)."""
    return {tag(k): float(v) for k, v in row.items()
            if k not in SKIP_KEYS and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


def flat_spec(spec: Spec) -> dict[str, Any]:
    """The spec as dotted keys of scalars (lists and mappings as JSON): the hyperparameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list | dict):
            out[prefix] = json.dumps(v)
        else:
            out[prefix] = v

    walk("", spec.to_dict())
    return out


def sweep_of(run: RunFolder) -> dict[str, Any] | None:
    """The sweep a trial belongs to (sweep.json, written by the sweep controller)."""
    return read_json(run.path / "sweep.json")


# -- exporters ----------------------------------------------------------------------------


class Exporter:
    """One target. `state` is reports/<target>.json (saved by the caller after each call)."""

    name = ""

    def __init__(self, run: RunFolder, state: dict[str, Any]):
        self.run, self.state, self.spec = run, state, run.spec

    def open(self) -> None: ...

    def params(self, flat: dict[str, Any]) -> None: ...

    def metrics(self, rows: list[dict[str, Any]]) -> None: ...

    def evaluation(self, eval_dir: Path, result: dict[str, Any]) -> None: ...

    def finish(self, state: str) -> None: ...

    def close(self) -> None: ...

    def where(self) -> str:
        return ""


class TensorBoard(Exporter):
    name = "tensorboard"

    def open(self) -> None:
        from tensorboardX import FileWriter

        self.logdir = self.run.path / TENSORBOARD_DIR
        self.writer = FileWriter(str(self.logdir), flush_secs=5)

    def _add(self, summary: Any, step: int | None = None, walltime: float | None = None) -> None:
        self.writer.add_summary(summary, step, walltime)

    def params(self, flat: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams, text

        hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        for s in hparams(hp, {"val/loss": 0.0}):  # the HPARAMS tab: the spec beside the runs' val/loss
            self._add(s)
        self._add(text("spec", "```yaml\n" + self.spec.to_yaml() + "```"), 0)

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        from tensorboardX.summary import scalar

        for row in rows:
            for k, v in scalars(row).items():
                self._add(scalar(k, v), int(row["step"]), row.get("time"))

    def evaluation(self, eval_dir: Path, result: dict[str, Any]) -> None:
        from tensorboardX.summary import scalar

        for k, v in eval_numbers(result).items():
            self._add(scalar(f"eval/{k}", v), int(result.get("step") or 0))

    def close(self) -> None:
        self.writer.close()

    def where(self) -> str:
        return f"tensorboard --logdir {self.run.path.parent}"


class MLflow(Exporter):
    name = "mlflow"

    def open(self) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines on creating the store's tables
            logging.getLogger(name).setLevel(logging.WARNING)

        root = self.run.path.parent
        self.uri = self.tracking_uri()
        with _flock(root / ".mlflow.lock", LOCK_WAIT_S):  # one process creates the tables and the experiment
            self.client = MlflowClient(tracking_uri=self.uri)
            name = self.spec.report.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                where = None if self.spec.report.tracking_uri else (root / "mlartifacts").as_uri()
                self.experiment = self.client.create_experiment(name, artifact_location=where)
            else:
                self.experiment = exp.experiment_id
        if self.state.get("run_id"):
            self.client.update_run(self.state["run_id"], status="RUNNING")
            return
        tags = {"jupyter_llm.run_id": self.run.id, "jupyter_llm.folder": str(self.run.path)}
        if sweep := sweep_of(self.run):
            tags["mlflow.parentRunId"] = self._parent(sweep)
            tags["jupyter_llm.trial"] = str(sweep.get("trial"))
        run = self.client.create_run(self.experiment, run_name=self.spec.name, tags=tags)
        self.state["run_id"] = run.info.run_id

    def _parent(self, sweep: dict[str, Any]) -> str:
        """The sweep's MLflow run (created by its first trial): its trials are nested under it."""
        sid = str(sweep["sweep_id"])
        with _flock(Path(sweep["sweep_path"]) / ".mlflow.lock", LOCK_WAIT_S):
            found = self.client.search_runs(
                [self.experiment], filter_string=f"tags.`jupyter_llm.sweep_id` = '{sid}'", max_results=1
            )
            if found:
                return str(found[0].info.run_id)
            parent = self.client.create_run(self.experiment, run_name=sid,
                                            tags={"jupyter_llm.sweep_id": sid, "jupyter_llm.kind": "sweep"})  # fmt: skip
            self.client.set_terminated(parent.info.run_id, "FINISHED")
            return str(parent.info.run_id)

    def params(self, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.state["run_id"], params=items[i : i + 100])

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        points = [Metric(k, v, int(float(row.get("time") or time.time()) * 1000), int(row["step"]))
                  for row in rows for k, v in scalars(row).items()]  # fmt: skip
        for i in range(0, len(points), 1000):
            self.client.log_batch(self.state["run_id"], metrics=points[i : i + 1000])

    def evaluation(self, eval_dir: Path, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(result.get("step") or 0)
        points = [Metric(f"eval/{k}", v, now, step) for k, v in eval_numbers(result).items()]
        self.client.log_batch(self.state["run_id"], metrics=points)
        self.client.log_artifact(self.state["run_id"], str(eval_dir / "eval.json"), f"evals/{eval_dir.name}")

    def finish(self, state: str) -> None:
        final = self.run.path / FINAL_DIR
        ended = self.run.status().get("ended_at")
        if (
            self.spec.report.log_model
            and (final / "config.json").is_file()
            and self.state.get("model_logged") != ended
        ):
            self.client.log_artifacts(self.state["run_id"], str(final), "model")
            self.state["model_logged"] = ended
        status = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.state["run_id"], status)

    def tracking_uri(self) -> str:
        return self.spec.report.tracking_uri or f"sqlite:///{self.run.path.parent / 'mlflow.db'}"

    def where(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri()}"


class WandB(Exporter):
    name = "wandb"

    def open(self) -> None:
        import wandb

        r = self.spec.report
        self.state.setdefault("id", hashlib.sha1(self.run.id.encode()).hexdigest()[:16])
        sweep = sweep_of(self.run)
        self.wb = wandb.init(
            mode=r.wandb_mode, dir=str(self.run.path), project=r.experiment, entity=r.wandb_entity,
            name=self.spec.name, id=self.state["id"], resume="allow", group=sweep["sweep_id"] if sweep else None,
            notes=f"jupyter-llm run {self.run.id}", reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
        )  # fmt: skip

    def params(self, flat: dict[str, Any]) -> None:
        self.wb.config.update(flat, allow_val_change=True)

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.wb.log(scalars(row), step=int(row["step"]))

    def evaluation(self, eval_dir: Path, result: dict[str, Any]) -> None:
        self.wb.summary.update({f"eval/{k}": v for k, v in eval_numbers(result).items()})

    def finish(self, state: str) -> None:
        self.wb.finish(exit_code=0 if state == "completed" else 1)
        self.finished = True

    def close(self) -> None:
        if hasattr(self, "wb") and not getattr(self, "finished", False):
            self.wb.finish(exit_code=1)

    def where(self) -> str:
        return f"wandb sync {self.run.path / 'wandb'}" if self.spec.report.wandb_mode == "offline" else ""


class CSV(Exporter):
    """reports/metrics.csv, rewritten whole from the folder (one row per step and kind)."""

    name = "csv"

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        self._write()

    def evaluation(self, eval_dir: Path, result: dict[str, Any]) -> None:
        self._write()

    def _write(self) -> None:
        lines = [{"step": m["step"], "time": m.get("time"), **scalars(m)} for m in self.run.metrics()]
        for d in sorted((self.run.path / EVALS_DIR).glob("*")):
            res = read_json(d / "eval.json")
            if res:
                lines.append(
                    {"step": res.get("step"), **{f"eval/{k}": v for k, v in eval_numbers(res).items()}}
                )
        cols = list(dict.fromkeys(k for line in lines for k in line))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(lines)
        out = self.run.path / REPORTS_DIR / "metrics.csv"
        tmp = out.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, out)

    def where(self) -> str:
        return str(self.run.path / REPORTS_DIR / "metrics.csv")


EXPORTERS: dict[str, type[Exporter]] = {e.name: e for e in (TensorBoard, MLflow, WandB, CSV)}
assert set(EXPORTERS) == set(REPORT_TARGETS)


# -- the driver ---------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, wait_s: float) -> Iterator[None]:
    """An exclusive lock on `path`, waiting up to wait_s; TimeoutError after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} is held by another report") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Session:
    """The targets of one report of one run: opened once, synced until the run ends."""

    def __init__(self, run: RunFolder, targets: list[str]):
        self.run = run
        self.dir = run.path / REPORTS_DIR
        self.dir.mkdir(exist_ok=True)
        self.exporters: list[Exporter] = []
        self.failed: dict[str, str] = {}
        self.sent = dict.fromkeys(targets, 0)  # metric lines sent by this session
        self.stack = contextlib.ExitStack()
        for t in targets:
            try:
                self.stack.enter_context(_flock(self.dir / f"{t}.lock", LOCK_WAIT_S))
            except TimeoutError:
                self.stack.close()
                raise UserError(
                    f"report_to {t}: another report of run {run.id} is sending to it (its follower, "
                    "while the run runs); try again once the run has ended"
                ) from None
            e = EXPORTERS[t](run, read_json(self.dir / f"{t}.json") or {})
            self._call(e, "open")
            if t not in self.failed:
                self.exporters.append(e)

    def _save(self, e: Exporter) -> None:
        write_json_atomic(self.dir / f"{e.name}.json", e.state)

    def _call(self, e: Exporter, what: str, *args: Any) -> bool:
        try:
            getattr(e, what)(*args)
            return True
        except Exception as ex:  # a target that fails never stops the others, nor the run
            why = f"{type(ex).__name__}: {ex}"
            print(f"report_to {e.name}: {what} failed: {why}", file=sys.stderr, flush=True)
            if self.failed.get(e.name) != why:
                record_event(self.run.path, Event.REPORT_ERROR, target=e.name, error=why[:500])
            self.failed[e.name] = why
            e.state["error"] = why[:2000]
            self._save(e)
            return False

    def sync(self) -> None:
        """Send what each target has not received: parameters once, new metric lines, new evaluations."""
        lines = self.run.metrics(dedupe=False)
        evals = sorted(d for d in (self.run.path / EVALS_DIR).glob("*") if (d / "eval.json").is_file())
        for e in self.exporters:
            st = e.state
            if not st.get("params") and self._call(e, "params", flat_spec(e.spec)):
                st["params"] = True
            last_t, last_v = st.get("train_step", -1), st.get("val_step", -1)
            new = [m for m in lines
                   if ("val_loss" in m and m["step"] > last_v) or ("val_loss" not in m and m["step"] > last_t)]  # fmt: skip
            if new and self._call(e, "metrics", new):
                st["train_step"] = max([last_t, *(m["step"] for m in new if "val_loss" not in m)])
                st["val_step"] = max([last_v, *(m["step"] for m in new if "val_loss" in m)])
                st["points"] = st.get("points", 0) + len(new)
                self.sent[e.name] += len(new)
            done = set(st.get("evals", []))
            for d in evals:
                res = read_json(d / "eval.json")
                if d.name not in done and res and self._call(e, "evaluation", d, res):
                    done.add(d.name)
            st["evals"] = sorted(done)
            if e.name not in self.failed:
                st.pop("error", None)
            self._save(e)

    def finish(self) -> None:
        state = self.run.state
        for e in self.exporters:
            if self._call(e, "finish", state):
                e.state["finished"] = self.run.status().get("ended_at")
            self._save(e)
        self.close()

    def close(self) -> None:
        for e in self.exporters:
            with contextlib.suppress(Exception):
                e.close()
        self.exporters = []
        self.stack.close()

    def lines(self) -> list[str]:
        out = []
        for t, n in self.sent.items():
            e = EXPORTERS[t](self.run, read_json(self.dir / f"{t}.json") or {})
            if t in self.failed:
                out.append(f"{t}: failed: {self.failed[t]}")
                continue
            total, evals = e.state.get("points", 0), len(e.state.get("evals", []))
            text = f"{t}: {n} new metric line(s) ({total} in all), {evals} evaluation(s)"
            out.append(text + (f"; open with: {e.where()}" if e.where() else ""))
        return out


def report(run: RunFolder, to: list[str] | str | None = None) -> list[str]:
    """Report `run` (its metrics, spec, evaluations and, when it ended, the final model) to the
    targets `to` (default: the spec's report_to), continuing each where it stopped. Returns a
    line per target: what was sent and how to open it."""
    targets = _targets(run, to)
    session = Session(run, targets)
    try:
        session.sync()
        if run.done:
            session.finish()
    finally:
        session.close()
    return session.lines()


def _targets(run: RunFolder, to: list[str] | str | None) -> list[str]:
    raw = run.spec.report_to if to is None else ([to] if isinstance(to, str) else list(to))
    targets = [p.strip() for t in raw for p in str(t).split(",") if p.strip()]
    bad = [t for t in targets if t not in EXPORTERS]
    if bad:
        raise UserError(f"unknown report target(s) {bad}: choose from {', '.join(REPORT_TARGETS)}")
    if not targets:
        raise UserError(
            f"run {run.id} has no report_to; name targets: --to tensorboard (or mlflow, wandb, csv)"
        )
    check_installed(targets)
    return targets


def follow(run: RunFolder, poll: float = POLL_S) -> int:
    """The follower: sync every `poll` seconds until the run ends (or its supervisor is gone)."""
    import psutil

    session = Session(run, list(run.spec.report_to))
    try:
        while True:
            session.sync()
            st = run.status()
            if State(st["state"]).terminal:
                break
            pid = st.get("pid")
            if pid and not psutil.pid_exists(int(pid)):  # the supervisor died without a final state
                break
            time.sleep(poll)
        session.finish()
    finally:
        session.close()
    for line in session.lines():
        print(line, flush=True)
    return 0


def start_follower(run_dir: Path) -> int:
    """Start the detached follower of `run_dir` (the supervisor does, for a spec with report_to)."""
    log = open(run_dir / LOGS_DIR / "report.log", "ab")  # noqa: SIM115 (the child holds it)
    with log:
        log.write(f"\n== report at {now_iso()}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "jupyter_llm.report", str(run_dir), "--follow"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=run_dir)  # fmt: skip
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jupyter_llm.report")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--follow", action="store_true")
    ap.add_argument("--to", action="append")
    a = ap.parse_args(argv)
    run = RunFolder(a.run_dir)
    if not (run.path / STATUS_FILE).is_file() or not (run.path / METRICS_FILE).parent.is_dir():
        print(f"{run.path}: not a run folder", file=sys.stderr)
        return 2
    if a.follow:
        return follow(run)
    for line in report(run, a.to):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
