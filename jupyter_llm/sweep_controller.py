"""The sweep controller: `python -m jupyter_llm.sweep_controller SWEEP_DIR [--detach]`.

An Optuna study driven by ask/tell. Each trial is a run launched through the public API in the
sweep's runs root (at most `parallel` at once); the controller follows each run's metrics.jsonl
(only the bytes appended since its last look), reports the pruning metric as the trial's
intermediate values, and stops a pruned trial gracefully (`Run.stop`; its checkpoint is then
removed: a pruned trial is never resumed). A run that fails, or a spec the sampled parameters
make invalid, is told FAIL and the study goes on. Restarted after a kill, the controller loads
the study from its storage and reattaches to the trials still RUNNING there by their run ids.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import optuna

from .errors import SpecError
from .files import Tail, now_iso, read_json, write_json_atomic
from .folder import METRICS_FILE, Event, State
from .runs import Run, RunStore
from .sweep import Sweep, SweepSpec

POLL_S = 0.5
_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True


def _sampler(sw: SweepSpec) -> optuna.samplers.BaseSampler:
    if sw.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sw.seed)
    return optuna.samplers.TPESampler(seed=sw.seed)


def _pruner(sw: SweepSpec) -> optuna.pruners.BasePruner:
    p = sw.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _suggest(trial: optuna.Trial, sw: SweepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in sw.space.items():
        if p.loguniform is not None:
            out[key] = trial.suggest_float(key, *p.loguniform, log=True)
        elif p.uniform is not None:
            out[key] = trial.suggest_float(key, *p.uniform)
        elif p.int is not None:
            out[key] = trial.suggest_int(key, *p.int)
        else:
            out[key] = trial.suggest_categorical(key, p.choice)  # type: ignore[arg-type]
    return out


class Controller:
    def __init__(self, path: Path):
        self.sweep = Sweep(path)
        self.path = path
        self.sw = self.sweep.spec
        self.store: RunStore = self.sweep.store
        storage = self.sw.storage or f"sqlite:///{path / 'study.db'}"
        self.study = optuna.create_study(
            study_name=self.sweep.id, storage=storage, load_if_exists=True, sampler=_sampler(self.sw),
            pruner=_pruner(self.sw), direction=self.sw.objective.direction,
        )  # fmt: skip
        self.active: dict[int, tuple[optuna.Trial, Run]] = {}
        self.tails: dict[int, Tail] = {}  # each active trial's metrics
        self.pruning: set[int] = set()
        self.t0 = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------

    def set_status(self, state: str, **extra: Any) -> None:
        st = read_json(self.path / "status.json") or {}
        write_json_atomic(self.path / "status.json", {**st, "state": state, **extra})

    def main(self) -> int:
        import psutil

        me = psutil.Process()
        self.set_status("running", pid=me.pid, pid_create_time=me.create_time(), started_at=now_iso(),
                        ended_at=None, error=None)  # fmt: skip
        try:
            self._first_time()
            self._reattach()
            self._loop()
        except BaseException as e:
            traceback.print_exc()
            self._snapshot()
            self.set_status("failed", ended_at=now_iso(), error=f"{type(e).__name__}: {e}")
            return 1
        self._snapshot()
        if _stop:
            self.set_status("stopped", ended_at=now_iso())
        else:
            best = self.sweep.best()
            self.set_status("completed", ended_at=now_iso(), best=best)
        return 0

    def _first_time(self) -> None:
        st = read_json(self.path / "status.json") or {}
        if not st.get("enqueued"):
            for params in self.sw.enqueue:
                self.study.enqueue_trial(params)
            self.set_status("running", enqueued=True)

    def _reattach(self) -> None:
        """Trials RUNNING in the storage belong to an earlier controller: follow their runs."""
        for ft in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            run_id = ft.user_attrs.get("run_id")
            trial = optuna.Trial(self.study, ft._trial_id)
            if not run_id:
                self._tell_fail(trial, "the controller was killed before the trial's run started")
                continue
            run = self.store.get(run_id)
            self.active[ft.number] = (trial, run)
            if ft.user_attrs.get("pruning"):
                self.pruning.add(ft.number)
            print(f"reattached to trial {ft.number} ({run_id}, {run.state})", flush=True)

    def _started(self) -> int:
        return sum(
            1 for t in self.study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING
        )

    def _loop(self) -> None:
        while True:
            for number in list(self.active):
                self._follow(number)
            out_of_time = self.sw.budget_s is not None and time.monotonic() - self.t0 > self.sw.budget_s
            if _stop:
                self._stop_all()
                return
            while (
                len(self.active) < self.sw.parallel and self._started() < self.sw.trials and not out_of_time
            ):
                self._start_trial()
            self._snapshot()
            if not self.active and (self._started() >= self.sw.trials or out_of_time):
                return
            time.sleep(POLL_S)

    # -- trials ---------------------------------------------------------------------------

    def _start_trial(self) -> None:
        from .runs import launch
        from .spec import Spec

        trial = self.study.ask()
        params = _suggest(trial, self.sw)
        base = dict(self.sw.base) if isinstance(self.sw.base, dict) else {}
        base["name"] = f"{self.sw.name}-t{trial.number}"
        try:
            spec = Spec.from_dict(base, params)
        except SpecError as e:  # the sampled parameters make an invalid spec: a failed trial
            self._tell_fail(trial, str(e))
            return
        record = {
            "sweep_id": self.sweep.id,
            "sweep_path": str(self.path),
            "trial": trial.number,
            "params": params,
        }
        run = launch(spec, root=self.store.root, records={"sweep.json": record})
        trial.set_user_attr("run_id", run.id)
        self.active[trial.number] = (trial, run)
        print(f"trial {trial.number}: {run.id} {params}", flush=True)

    def _follow(self, number: int) -> None:
        trial, run = self.active[number]
        metric = self.sw.pruning_metric()
        tail = self.tails.setdefault(number, Tail(run.path / METRICS_FILE))
        for m in tail.read():
            if m.get(metric) is not None and number not in self.pruning:
                trial.report(float(m[metric]), int(m["step"]))
                if trial.should_prune():
                    self.pruning.add(number)
                    trial.set_user_attr("pruning", True)
                    trial.set_user_attr("pruned_at_step", int(m["step"]))
                    print(f"trial {number}: pruned at step {m['step']}; stopping {run.id}", flush=True)
                    if not run.done:
                        run.stop()
        if not run.done:
            return
        del self.active[number]
        state = run.state
        if number in self.pruning:
            shutil.rmtree(run.path / "checkpoints", ignore_errors=True)  # a pruned trial is never resumed
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif state == State.COMPLETED.value:
            try:
                value = self._objective(run)
            except Exception as e:
                self._tell_fail(trial, f"objective: {e}")
                return
            self.study.tell(trial, value)
            print(f"trial {number}: {self.sw.objective.metric}={value:.6g}", flush=True)
        else:
            self._tell_fail(trial, run.status().get("error") or f"run {state}")

    def _tell_fail(self, trial: optuna.Trial, error: str) -> None:
        trial.set_user_attr("error", error[:2000])
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number}: failed: {error}", flush=True)

    def _objective(self, run: Run) -> float:
        obj = self.sw.objective
        if obj.metric.startswith("eval."):
            value: Any = self._eval_result(run)
            for part in obj.metric.split(".")[1:]:
                value = value[part]
            return float(value)
        values = [float(m[obj.metric]) for m in run.metrics() if m.get(obj.metric) is not None]
        if not values:
            raise ValueError(f"run {run.id} logged no {obj.metric!r}")
        if obj.at == "end":
            return values[-1]
        return min(values) if obj.direction == "minimize" else max(values)

    def _eval_result(self, run: Run) -> dict[str, Any]:
        """The evaluation the run's eval: section started when training completed."""
        from .evaluation import Evaluation

        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not _stop:
            started = [e for e in run.events() if e["event"] in (Event.EVAL_STARTED, Event.EVAL_NOT_STARTED)]
            if started and started[0]["event"] == Event.EVAL_NOT_STARTED:
                raise RuntimeError(started[0].get("error", "the evaluation did not start"))
            if started:
                ev = Evaluation(run.path / "evals" / started[0]["eval_id"])
                if ev.done:
                    if ev.state != "completed" or ev.result is None:
                        raise RuntimeError(ev.status().get("error") or f"evaluation {ev.state}")
                    return ev.result
            time.sleep(POLL_S)
        raise TimeoutError("the evaluation did not finish")

    def _stop_all(self) -> None:
        """Sweep stopped: stop every running trial; they are recorded failed (interrupted)."""
        for _, run in self.active.values():
            if not run.done:
                run.stop()
        for number, (trial, run) in list(self.active.items()):
            run.wait(600)
            self._tell_fail(trial, "the sweep was stopped")
            del self.active[number]

    def _snapshot(self) -> None:
        """trials.json for readers that do not import optuna (views, CLI)."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
            rows.append({"number": t.number, "state": t.state.name, "params": t.params,
                         "value": None if value is None or math.isnan(value) else value,
                         "run_id": t.user_attrs.get("run_id"), "error": t.user_attrs.get("error"),
                         "pruned_at_step": t.user_attrs.get("pruned_at_step"),
                         "intermediate": {str(k): v for k, v in t.intermediate_values.items()}})  # fmt: skip
        write_json_atomic(self.path / "trials.json", {"time": now_iso(), "trials": rows})


def main(path: Path) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Controller(path).main()


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) > 2 or (len(args) == 2 and args[1] != "--detach"):
        sys.exit("usage: python -m jupyter_llm.sweep_controller SWEEP_DIR [--detach]")
    target = Path(args[0]).resolve()
    if "--detach" in args:  # the caller returns at once; the job lives in a session of its own
        from .detach import detach

        detach(target, "controller.log")
    sys.exit(main(target))
