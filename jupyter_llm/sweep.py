"""Hyperparameter sweeps: an Optuna study whose every trial is its own run (DeepSpeed launch).

    sw = jupyter_llm.sweep("sweep.yaml")        # or a dict / YAML text; returns at once
    sw.trials(); sw.best(); sw.wait(); sw.launch_best()

A sweep is a folder `<runs root>/_sweeps/<id>/`: sweep.yaml, status.json, controller.log,
trials.json (the controller's snapshot for readers) and, by default, the Optuna storage
study.db (`storage:` takes any RDB URL to share a study). The controller is a detached process
(`python -m jupyter_llm.sweep_controller SWEEP_DIR`); restarted after a kill it loads the study
and reattaches to the trials' runs. Nothing here imports torch or optuna.
"""

from __future__ import annotations

import builtins
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .detach import DetachedJob
from .errors import MISSING, Problem, RunStateError, SpecError, UserError
from .files import now_iso, read_json, write_json_atomic
from .folder import State, default_root
from .inputs import InputError, load_yaml, read_text
from .runs import Run, RunStore
from .spec import Spec, apply_overrides


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One dimension of the search space: exactly one of the four kinds."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None  # the builtin: this field shadows the name
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        kinds = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of loguniform: [lo, hi], uniform: [lo, hi], int: [lo, hi], choice: [...]"
            )
        bounds = getattr(self, kinds[0])
        if kinds[0] == "choice" and not bounds:
            raise ValueError("choice needs at least one value")
        if kinds[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{kinds[0]}: the low bound must be below the high bound")
        if kinds[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None)

    def example(self) -> Any:
        """A value inside the range (validates the base spec with every key set)."""
        v = getattr(self, self.kind)
        return (
            v[0]
            if self.kind in ("choice", "int")
            else (v[0] * v[1]) ** 0.5
            if self.kind == "loguniform"
            else v[0]
        )


class Objective(_Strict):
    # a metrics.jsonl key (val_loss, loss, val_ppl, ...) or eval.<path> into eval.json
    # (eval.perplexity.ppl, eval.bleu; needs the base spec's eval: section)
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    at: Literal["end", "best"] = "end"  # the value at the end of the run, or its best


class Pruner(_Strict):
    kind: Literal["median", "halving", "none"] = "median"
    startup_trials: int = Field(2, ge=0)  # completed trials before the median pruner prunes
    warmup_steps: int = Field(0, ge=0)  # steps of each trial before it can be pruned
    # the metrics.jsonl key reported as the trial's intermediate value (default: the objective's,
    # or val_loss for an eval objective)
    metric: str | None = None


class SweepSpec(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
    base: dict[str, Any] | str  # the spec each trial starts from: a mapping or a YAML file
    space: dict[str, Param]  # dotted spec keys → ranges
    objective: Objective = Objective()
    trials: int = Field(10, ge=1, le=10_000)
    parallel: int = Field(1, ge=1, le=256)  # trials running at once
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = Field(None, ge=0)
    pruner: Pruner = Pruner()
    budget_s: float | None = Field(None, gt=0)  # no new trial starts after this many seconds
    storage: str | None = None  # an RDB URL; default sqlite:///<sweep folder>/study.db
    enqueue: list[dict[str, Any]] = []  # parameter sets tried first (known-good or known-bad)
    full: dict[str, Any] = {}  # overrides for "launch the best as a full run" (e.g. train.max_steps)

    @field_validator("space")
    @classmethod
    def _not_empty(cls, v: dict[str, Param]) -> dict[str, Param]:
        if not v:
            raise ValueError(
                "needs at least one dotted spec key to search, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}"
            )
        return v

    def pruning_metric(self) -> str:
        return self.pruner.metric or (
            "val_loss" if self.objective.metric.startswith("eval.") else self.objective.metric
        )


def load_sweep_spec(source: Any, base_dir: Path | None = None) -> tuple[SweepSpec, Spec]:
    """A SweepSpec (from a mapping, YAML text or file) and its validated base Spec."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and
                                           source.endswith((".yaml", ".yml"))):  # fmt: skip
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise SpecError([Problem("<file>", str(source), "sweep file not found")])
        try:
            base_dir, source = path.parent, read_text(path)
        except InputError as e:
            raise SpecError([Problem("<file>", str(source), e.detail)]) from None
    if isinstance(source, str):
        try:
            source = load_yaml(source)
        except InputError as e:
            raise SpecError([Problem("<yaml>", MISSING, e.detail)]) from None
    if not isinstance(source, Mapping):
        raise SpecError(
            [Problem("<sweep>", source, "a sweep is a mapping: name, base, space, objective, ...")]
        )
    base_dir = base_dir or Path.cwd()
    try:
        sw = SweepSpec.model_validate(source)
    except ValidationError as e:
        from .spec import validation_problems

        raise SpecError(validation_problems(e)) from None
    if isinstance(sw.base, str):
        base_path = (base_dir / sw.base).resolve()
        base = Spec.from_file(base_path)
    else:
        base = _prefixed("base.", lambda: Spec.from_dict(sw.base, base_dir=base_dir))
    probe = {k: p.example() for k, p in sw.space.items()}
    _prefixed("space: ", lambda: Spec.from_dict(base.to_dict(), probe))
    problems = []
    if sw.objective.metric.startswith("eval.") and base.eval is None:
        problems.append(
            Problem("objective.metric", sw.objective.metric, "an eval.* objective needs base.eval")
        )
    if sw.objective.metric.startswith("eval.") and sw.objective.at == "best":
        problems.append(Problem("objective.at", "best", "an evaluation has one value: use at: end"))
    ranks, capacity = _ranks(base), _capacity()
    if base.distributed.nodes == 1 and sw.parallel * ranks > capacity:  # trials on this machine
        problems.append(Problem("parallel", sw.parallel, f"{sw.parallel} trials × {ranks} rank(s) would oversubscribe "
                                f"this machine's {capacity} {'GPU' if _gpus() else 'core'}(s); lower parallel"))  # fmt: skip
    for i, params in enumerate(sw.enqueue):
        unknown = sorted(set(params) - set(sw.space))
        if unknown:
            problems.append(Problem(f"enqueue[{i}]", unknown, f"keys not in space ({', '.join(sw.space)})"))
    if problems:
        raise SpecError(problems)
    return sw.model_copy(update={"base": base.to_dict()}), base


def _prefixed(prefix: str, make: Any) -> Any:
    try:
        return make()
    except SpecError as e:
        raise SpecError([Problem(prefix + p.path, p.given, p.message) for p in e.problems]) from None


def _gpus() -> int:
    from .devices import gpu_count

    return gpu_count()


def _ranks(spec: Spec) -> int:
    pp = spec.distributed.procs_per_node
    return pp if isinstance(pp, int) else max(1, _gpus())


def _capacity() -> int:
    return _gpus() or os.cpu_count() or 1


def sweeps_root(root: str | os.PathLike[str] | None = None) -> Path:
    return (Path(root) if root else default_root()) / "_sweeps"


def sweep(source: Any, *, root: str | os.PathLike[str] | None = None, wait: bool = False,
          timeout: float | None = None) -> Sweep:  # fmt: skip
    """Validate a sweep (mapping, YAML text or file), create its folder, start its controller."""
    sw, _ = load_sweep_spec(source)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    path = sweeps_root(root) / f"{stamp}-{sw.name}"
    path.mkdir(parents=True)
    (path / "sweep.yaml").write_text(yaml.safe_dump(sw.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(path / "status.json", {"state": "created", "name": sw.name, "created_at": now_iso(),
                                             "runs_root": str(Path(root) if root else default_root())})  # fmt: skip
    s = Sweep(path)
    s._start()
    if wait:
        s.wait(timeout)
    return s


class Sweep(DetachedJob):
    """Handle of a sweep folder; readers only (the controller writes)."""

    what = "sweep controller"
    hint = "; resume() it"

    def __repr__(self) -> str:
        return f"Sweep({self.id}: {self.state})"

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate(yaml.safe_load((self.path / "sweep.yaml").read_text()))

    @property
    def store(self) -> RunStore:
        return RunStore((self.status_raw() or {}).get("runs_root") or self.path.parent.parent)

    def trials(self) -> list[dict[str, Any]]:
        """Every trial: number, state, params, value, run_id, error (the controller's snapshot)."""
        return list((read_json(self.path / "trials.json") or {}).get("trials", []))

    def best(self) -> dict[str, Any] | None:
        done = [t for t in self.trials() if t["state"] == "COMPLETE" and t["value"] is not None]
        if not done:
            return None
        pick = min if self.spec.objective.direction == "minimize" else max
        return pick(done, key=lambda t: t["value"])

    def runs(self) -> list[Run]:
        return [self.store.get(t["run_id"]) for t in self.trials() if t.get("run_id")]

    def best_spec(self, overrides: Mapping[str, Any] | None = None) -> Spec:
        """The base spec with the best trial's parameters (and the sweep's `full:` overrides)."""
        best = self.best()
        if best is None:
            raise RunStateError(f"sweep {self.id} has no completed trial yet")
        spec = self.spec
        data = apply_overrides(dict(spec.base) if isinstance(spec.base, dict) else {}, best["params"])
        data = apply_overrides(data, {**spec.full, **(overrides or {})})
        data["name"] = f"{spec.name}-best"
        return Spec.from_dict(data)

    def launch_best(self, overrides: Mapping[str, Any] | None = None) -> Run:
        """Launch the best trial's spec as a full run."""
        from .runs import launch

        return launch(self.best_spec(overrides), root=self.store.root)

    def stop(self) -> str:
        """Ask the controller to stop: running trials are stopped and recorded failed."""
        st = self.status()
        if State(st["state"]).terminal:
            return str(st["state"])
        if st["state"] == "created" or not self.alive(st):
            raise RunStateError(f"sweep {self.id} has no live controller")
        os.kill(int(st["pid"]), signal.SIGTERM)
        return "stopping"

    def resume(self) -> Sweep:
        """Restart the controller of a killed, failed or stopped sweep; the study goes on."""
        st = self.status()
        if st["state"] == "completed":
            raise RunStateError(f"sweep {self.id} already completed")
        if not State(st["state"]).terminal and st["state"] != "created":
            raise RunStateError(f"sweep {self.id} is {st['state']}; its controller is alive")
        self._start()
        return self

    def _start(self) -> None:
        with open(self.path / "controller.log", "ab") as log:
            subprocess.run([sys.executable, "-m", "jupyter_llm.sweep_controller", str(self.path), "--detach"],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip

    def summary(self) -> str:
        st, best = self.status(), self.best()
        counts: dict[str, int] = {}
        for t in self.trials():
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        text = f"sweep {self.id}: {st['state']}, trials " + ", ".join(
            f"{k.lower()} {v}" for k, v in sorted(counts.items())
        )
        if best:
            text += f"\n  best: trial {best['number']} {self.spec.objective.metric}={best['value']:.5g} {best['params']}"
        if st.get("error"):
            text += f"\n  error: {st['error']}"
        return text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


def get_sweep(sweep_id: str | None = None, root: str | os.PathLike[str] | None = None) -> Sweep:
    """A sweep by id, unique id prefix or name; the newest when None."""
    base = sweeps_root(root)
    found = sorted(p for p in base.iterdir() if (p / "sweep.yaml").is_file()) if base.is_dir() else []
    if sweep_id is None:
        if not found:
            raise UserError(f"no sweeps under {base}")
        return Sweep(found[-1])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", sweep_id):
        raise UserError(f"not a sweep id: {sweep_id!r}")
    match = [
        p
        for p in found
        if p.name == sweep_id or p.name.startswith(sweep_id) or p.name.endswith("-" + sweep_id)
    ]
    if len(match) != 1:
        raise UserError(f"{'no' if not match else 'more than one'} sweep matches {sweep_id!r} under {base}")
    return Sweep(match[0])


class _CallableModule(types.ModuleType):
    """`jupyter_llm.sweep` is this module and the `sweep()` function at once (importing the
    submodule rebinds the package attribute to the module, so the module answers the call)."""

    def __call__(self, source: Any, **kwargs: Any) -> Sweep:
        return sweep(source, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
