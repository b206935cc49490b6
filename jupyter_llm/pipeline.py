"""Papermill pipelines: the notebooks a person explores with, run as reproducible stages.

    jupyter-llm pipeline run notebooks/pipeline.yaml -p max_steps=500 [--out DIR] [--resume DIR]
    jupyter_llm.pipeline.run("notebooks/pipeline.yaml", {"max_steps": 500})

A pipeline file names its stages (a notebook each, with a cell tagged `parameters`), the shared
parameters, and the hand-offs: `inputs: {train_run: prepare.run_id}` passes an output that an
earlier stage recorded (`jupyter_llm.pipeline.record(pipeline_outputs, run_id=...)`, a no-op
when the notebook runs on its own) as a parameter of a later one. Each run of a pipeline is a
folder (`<runs root>/_pipelines/<id>/` or `--out`): the executed notebooks, `manifest.json`
(parameters, stage states and outputs, run ids, versions, git sha, input hashes) and
`summary.json`. A failing stage keeps its executed notebook with the error, later stages do not
run, and `resume` continues from that stage (with new parameters if given).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import platform
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import JupyterLLMError, Problem, SpecError, UserError
from .files import now_iso, read_json, write_json_atomic
from .folder import default_root
from .hashing import content_sha256
from .inputs import InputError, load_yaml, read_text
from .provenance import git_sha, versions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    notebook: str  # relative to the pipeline file
    parameters: dict[str, Any] = {}  # this stage's own, over the shared ones
    inputs: dict[str, str] = {}  # parameter → "stage.output" recorded by an earlier stage


class PipelineSpec(_Strict):
    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
    parameters: dict[str, Any] = {}  # shared by every stage; `-p key=value` overrides
    stages: list[Stage]
    kernel: str = "python3"

    @model_validator(mode="after")
    def _hand_offs(self) -> PipelineSpec:
        seen: list[str] = []
        for st in self.stages:
            if st.name in seen:
                raise ValueError(f"two stages are named {st.name!r}")
            for param, ref in st.inputs.items():
                stage, _, key = ref.partition(".")
                if stage not in seen or not key:
                    raise ValueError(f"stage {st.name}: input {param}: {ref!r} must be EARLIER_STAGE.output "
                                     f"(earlier stages: {', '.join(seen) or 'none'})")  # fmt: skip
            seen.append(st.name)
        if not self.stages:
            raise ValueError("needs at least one stage")
        return self


class PipelineError(JupyterLLMError):
    """A stage failed; the message names the stage and the cell, the folder keeps its notebook."""

    def __init__(self, message: str, folder: Path):
        super().__init__(message)
        self.folder = folder


def load(path: str | os.PathLike[str]) -> tuple[PipelineSpec, Path]:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise SpecError([Problem("<file>", str(path), "pipeline file not found")])
    try:
        data = load_yaml(read_text(p), str(p))
    except InputError as e:
        raise SpecError([Problem("<file>", str(path), e.detail)]) from None
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        from .spec import validation_problems

        raise SpecError(validation_problems(e)) from None
    missing = [s.notebook for s in spec.stages if not (p.parent / s.notebook).is_file()]
    if missing:
        raise SpecError([Problem("stages", missing, f"notebook(s) not found next to {p.name}")])
    return spec, p


def parse_params(items: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML) or a mapping."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"-p {item!r}: give key=value")
        out[key.strip()] = load_yaml(value, f"-p {key.strip()}") if value.strip() else ""
    return out


_KINDS: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,),
                                         list: (list,), dict: (dict,)}  # fmt: skip


def check_params(
    spec: PipelineSpec, declared: Mapping[str, Mapping[str, Any]], given: Mapping[str, Any], allow_extra: bool
) -> None:
    """Every value against the type of each declaring notebook's default (None: any type)."""
    problems = []
    stage_of = {s.name: s for s in spec.stages}
    sources = [("-p", k, v, list(declared)) for k, v in given.items()]
    sources += [("parameters", k, v, list(declared)) for k, v in spec.parameters.items() if k not in given]
    sources += [
        (f"stages.{n}.parameters", k, v, [n]) for n, st in stage_of.items() for k, v in st.parameters.items()
    ]
    for where, key, value, stages in sources:
        owners = [n for n in stages if key in declared[n]]
        if not owners and not allow_extra:
            names = sorted({k for n in stages for k in declared[n]} - {"pipeline_outputs"})
            problems.append(Problem(f"{where} {key}", value, "no stage's parameters cell declares it (declared: "
                                    f"{', '.join(names)}); pass --allow-extra to let it through"))  # fmt: skip
        for n in owners:
            default = declared[n][key].get("default")
            try:
                kind = type(ast.literal_eval(default)) if default else type(None)
            except (ValueError, SyntaxError):
                continue  # an expression: no type to hold it to
            ok = _KINDS.get(kind)
            if ok and not (isinstance(value, ok) and not (isinstance(value, bool) and bool not in ok)):
                problems.append(Problem(f"{where} {key}", value, f"{stage_of[n].notebook} has {key} = {default} "
                                        f"({_a(kind.__name__)}); give {_a(kind.__name__)}"))  # fmt: skip
                break
    if problems:
        raise SpecError(problems)


def _declared(pm: Any, notebook: Path) -> dict[str, Any]:
    """The notebook's `parameters` cell as papermill reads it (name → default, help)."""
    try:
        return dict(pm.inspect_notebook(str(notebook)))
    except Exception as e:  # papermill raises ValueError, JSON and nbformat errors alike
        raise SpecError(
            [Problem("stages", notebook.name, f"papermill cannot read its parameters: {e}")]
        ) from None


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def record(pipeline_outputs: str | None, **outputs: Any) -> None:
    """Record a stage's outputs for later stages (a no-op outside a pipeline)."""
    if not pipeline_outputs:
        return
    path = Path(pipeline_outputs)
    write_json_atomic(path, {**(read_json(path) or {}), **outputs})


def run(
    pipeline: str | os.PathLike[str],
    params: list[str] | Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    log: Any = None,
    allow_extra: bool = False,
    progress: bool = False,
) -> Path:
    """Run every stage in order (or, with `resume=FOLDER`, from the first stage not completed);
    returns the pipeline folder. Raises PipelineError naming the failed stage and cell.

    Before anything runs, every parameter (the pipeline's, a stage's, `params`) is checked
    against the `parameters` cells: a value of another type than a cell's default is a
    SpecError naming the notebook; a name no stage declares is one too, unless `allow_extra`.
    `progress`: papermill's bar of each stage's cells (the CLI's, on a terminal)."""
    import papermill as pm
    from traitlets.config import Config

    spec, path = load(pipeline)
    given = parse_params(params)
    declared = {s.name: _declared(pm, path.parent / s.notebook) for s in spec.stages}  # read once
    check_params(spec, declared, given, allow_extra)
    if resume is not None:
        folder = Path(resume).resolve()
        manifest = read_json(folder / "manifest.json")
        if manifest is None:
            raise UserError(f"{folder} is not a pipeline folder (no manifest.json)")
        parameters = {**manifest["parameters"], **given}
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
        folder = Path(out).resolve() if out else default_root() / "_pipelines" / f"{stamp}-{spec.name}"
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} is not empty; give another --out, or --resume it")
        folder.mkdir(parents=True, exist_ok=True)
        parameters = {**spec.parameters, **given}
        manifest = {"pipeline": str(path), "name": spec.name, "created_at": now_iso(), "stages": {}}
    manifest.update(parameters=parameters, versions=versions(), git_sha=git_sha(str(path.parent)), host=platform.node(),
                    inputs={str(path): content_sha256(str(path)),
                            **{s.notebook: content_sha256(str(path.parent / s.notebook)) for s in spec.stages}},
                    state="running", error=None)  # fmt: skip
    outputs: dict[str, dict[str, Any]] = {n: st.get("outputs", {}) for n, st in manifest["stages"].items()}
    manifest["runs_root"] = manifest.get("runs_root") or str(default_root().resolve())
    write_json_atomic(folder / "manifest.json", manifest)
    # the stages' kernels start in the notebooks' folder: they get the runs root explicitly
    with _environ("JUPYTER_LLM_RUNS", manifest["runs_root"]), _environ("JUPYTER_LLM_PIPELINE", str(folder)), \
            _environ("JUPYTER_LLM_PIPELINE_STAGE", ""):  # fmt: skip
        for i, stage in enumerate(spec.stages):
            if manifest["stages"].get(stage.name, {}).get("state") == "completed":
                continue
            out_json = folder / f"{i + 1:02d}_{stage.name}.outputs.json"
            out_json.unlink(missing_ok=True)
            # the shared parameters this notebook declares (papermill warns about the others)
            shared = {k: v for k, v in parameters.items() if k in declared[stage.name]}
            stage_params = {**shared, **stage.parameters}
            if "pipeline_outputs" in declared[stage.name]:  # a notebook that records outputs
                stage_params["pipeline_outputs"] = str(out_json)
            for param, ref in stage.inputs.items():
                src, _, key = ref.partition(".")
                if key not in outputs.get(src, {}):
                    raise PipelineError(f"stage {stage.name}: stage {src} recorded no output {key!r}", folder)
                stage_params[param] = outputs[src][key]
            executed = folder / f"{i + 1:02d}_{stage.name}.ipynb"
            entry = {"notebook": stage.notebook, "executed": str(executed), "parameters": stage_params,
                     "state": "running", "started_at": now_iso()}  # fmt: skip
            manifest["stages"][stage.name] = entry
            write_json_atomic(folder / "manifest.json", manifest)
            if log:
                log(f"stage {stage.name}: {stage.notebook} -> {executed}")
            try:
                os.environ["JUPYTER_LLM_PIPELINE_STAGE"] = stage.name  # the stage's runs link back here
                # the kernel talks to us over local sockets (IPC), not TCP on localhost: nothing to
                # eavesdrop on, and no "running over TCP without encryption" warning per stage
                pm.execute_notebook(str(path.parent / stage.notebook), str(executed), parameters=stage_params,
                                    cwd=str(path.parent), kernel_name=spec.kernel, progress_bar=progress,
                                    config=Config({"KernelManager": {"transport": "ipc"}}))  # fmt: skip
            except Exception as e:
                error = _describe(stage.name, e, executed)
                entry.update(state="failed", ended_at=now_iso(), error=error)
                manifest.update(state="failed", error=error)
                write_json_atomic(folder / "manifest.json", manifest)
                raise PipelineError(error, folder) from None
            outputs[stage.name] = read_json(out_json) or {}
            entry.update(state="completed", ended_at=now_iso(), outputs=outputs[stage.name])
            write_json_atomic(folder / "manifest.json", manifest)
    manifest.update(state="completed", ended_at=now_iso())
    write_json_atomic(folder / "manifest.json", manifest)
    write_json_atomic(
        folder / "summary.json", {"pipeline": spec.name, "folder": str(folder), "outputs": outputs}
    )
    return folder


@contextlib.contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _describe(stage: str, e: Exception, executed: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(e, PapermillExecutionError):
        first = (e.source or "").strip().splitlines()[:1]
        return (f"stage {stage} failed in cell {e.cell_index} (execution {e.exec_count}"
                + (f": {first[0][:80]!r}" if first else "") + f"): {e.ename}: {e.evalue}; "
                f"the executed notebook is {executed}")  # fmt: skip
    return f"stage {stage} failed: {type(e).__name__}: {e}; see {executed}"


def summary_text(folder: Path) -> str:
    m = read_json(folder / "manifest.json") or {}
    lines = [f"pipeline {m.get('name')}: {m.get('state')}  ({folder})"]
    for name, st in (m.get("stages") or {}).items():
        lines.append(f"  {name:<10} {st['state']:<10} {st['executed']}")
        for k, v in (st.get("outputs") or {}).items():
            shown = (
                v
                if isinstance(v, str)
                else f"({len(v)} values)"
                if isinstance(v, dict | list)
                else json.dumps(v)
            )
            lines.append(f"      {k}: {shown}")
    if m.get("error"):
        lines.append(f"  error: {m['error']}")
    return "\n".join(lines)


def _loss_diff(a: Mapping[Any, float], b: Mapping[Any, float]) -> float | None:
    """Largest absolute difference of two loss curves; None when their steps differ."""
    if sorted(map(str, a)) != sorted(map(str, b)):
        return None
    bb = {str(k): v for k, v in b.items()}
    return max((abs(v - bb[str(k)]) for k, v in a.items()), default=0.0)


def reproduce(target: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
              log: Any = None) -> dict[str, Any]:  # fmt: skip
    """Rerun a run (its recorded spec and seed) or a pipeline folder (its recorded parameters)
    and compare the training loss curves: `equal` is True when they match exactly."""
    from .runs import RunStore

    folder = Path(target)
    if (folder / "manifest.json").is_file() and "pipeline" in (read_json(folder / "manifest.json") or {}):
        m = read_json(folder / "manifest.json") or {}
        new = run(m["pipeline"], m["parameters"], log=log)
        nm = read_json(new / "manifest.json") or {}
        old_l, new_l = _train_losses(m), _train_losses(nm)
        diff = _loss_diff(old_l, new_l) if old_l and new_l else None
        return {"kind": "pipeline", "original": str(folder), "new": str(new), "max_abs_diff": diff,
                "equal": diff == 0.0}  # fmt: skip
    from .runs import launch

    original = RunStore(root).get(str(target))
    again = launch(original.spec, root=original.path.parent)
    if log:
        log(f"reproducing {original.id} as {again.id}")
    again.wait()
    old_l = {m["step"]: m["loss"] for m in original.metrics() if "loss" in m}
    new_l = {m["step"]: m["loss"] for m in again.metrics() if "loss" in m}
    diff = _loss_diff(old_l, new_l) if again.state == "completed" else None
    return {"kind": "run", "original": original.id, "new": again.id, "state": again.state, "max_abs_diff": diff,
            "equal": diff == 0.0}  # fmt: skip


def _train_losses(manifest: Mapping[str, Any]) -> dict[str, float]:
    for st in (manifest.get("stages") or {}).values():
        losses = (st.get("outputs") or {}).get("losses")
        if losses:
            return dict(losses)
    return {}
