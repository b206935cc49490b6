"""Where a run goes. `launch(spec)` creates the run folder and starts a detached supervisor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UserError
from ..runs import Run, RunStore


def launch(
    spec: Any,
    overrides: list[str] | Mapping[str, Any] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    job: str = "train",
    transform: Callable[[str], Any] | None = None,
) -> Run:
    """Validate `spec` (Spec, dict, YAML text or path), create its run folder and start it.

    Returns at once with the `Run` handle (or after the run ends with `wait=True`).
    Spec problems raise `SpecError` before anything is written or started. `job="prepare"`
    runs only the data step (tokenizer, cleaning, packing into the cache), detached too.
    `transform(text) -> str | None | list[str]` is applied to every document before cleaning;
    it travels to the job with cloudpickle, so a function defined in a notebook works.
    """
    from ..spec import Spec  # lazy: the supervisor's spawner imports this package

    spec = Spec.load(spec, overrides)
    if transform is not None and not callable(transform):
        raise UserError(
            f"transform must be a function str -> str | None | list[str], not {type(transform).__name__}"
        )
    from ..cluster import resolve

    cluster = resolve(spec.distributed.nodes) if job == "train" else None  # unknown names fail here
    plan = None
    if job == "train" and "auto" in (spec.distributed.zero_stage, spec.distributed.offload):
        from ..preflight import fit_spec

        spec, plan = fit_spec(spec)  # DoesNotFit (how much is missing, what would fit) before anything
    if job == "train" and spec.distributed.tensor_parallel > 1:
        from ..preflight import check_tensor_parallel

        check_tensor_parallel(spec, local=cluster is None)
    if (
        job == "train"
        and spec.distributed.offload == "nvme"
        and cluster is None
        and spec.distributed.nvme_path
    ):
        from ..fit import nvme_check

        _, problem = nvme_check(spec.distributed.nvme_path)
        if problem:
            raise UserError(f"distributed.nvme_path: {problem}")
    run = RunStore(root).create(spec, job=job)
    if plan is not None:
        from ..runs import append_jsonl, now_iso, write_json_atomic

        record = plan.to_dict()
        write_json_atomic(run.path / "fit.json", record)
        append_jsonl(run.path / "events.jsonl",
                     {"time": now_iso(), "event": "fitted", **record["chosen"], "reason": plan.reason})  # fmt: skip
    if cluster is not None:
        from .multinode import write_cluster

        write_cluster(run.path, cluster)  # what this run uses, also when it is resumed
    if pipeline := os.environ.get("JUPYTER_LLM_PIPELINE"):  # launched by a pipeline stage's notebook
        from ..runs import write_json_atomic

        write_json_atomic(run.path / "pipeline.json",
                          {"pipeline": pipeline, "stage": os.environ.get("JUPYTER_LLM_PIPELINE_STAGE")})  # fmt: skip
    if transform is not None:
        import cloudpickle

        (run.path / "transform.pkl").write_bytes(cloudpickle.dumps(transform))
    start(run)
    if wait:
        run.wait(timeout)
    return run


def prepare(
    spec: Any,
    overrides: list[str] | Mapping[str, Any] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    transform: Callable[[str], Any] | None = None,
) -> Run:
    """Prepare the spec's data as a detached job; a later run of the spec hits the cache."""
    return launch(spec, overrides, root=root, wait=wait, timeout=timeout, job="prepare", transform=transform)


def start(run: Run, resume: bool = False) -> None:
    """Start the run's supervisor, detached: own session, no pipes, survives the caller.

    The supervisor forks once and the first process exits at once, so the caller has no
    child to reap and the job is reparented away from the kernel.
    """
    argv = [sys.executable, "-m", "jupyter_llm.launcher.supervisor", str(run.path), "--detach"]
    if resume:
        argv.append("--resume")
    env = dict(os.environ, JUPYTER_LLM_CALLER_CWD=os.getcwd())
    with open(run.path / "logs" / "supervisor.log", "ab") as log:
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=run.path, env=env, check=True,
        )  # fmt: skip


__all__ = ["launch", "prepare", "start"]
