"""Runs: the `Run` handle, the store, and `launch`/`prepare`, which create and start them.

The run folder is the only protocol between the kernel, the CLI, the supervisor and the
ranks; `folder` reads it, the launcher starts jobs on it, and this module puts both behind
one handle. Notebook displays (HTML, the live dashboard) register themselves from the
IPython side (`jupyter_llm.rich`); nothing here imports widgets, and nothing imports torch.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from .errors import DiskFull, RunStateError, UserError, disk_full_message, has_room
from .files import write_json_atomic
from .folder import (
    CKPT_MARKER,
    DS_CONFIG_FILE,
    RUN_ID_RE,
    SPEC_FILE,
    Event,
    FolderStore,
    RunFolder,
    State,
    default_root,
    record_event,
)

__all__ = [
    "CKPT_MARKER",
    "RESUME_KEYS",
    "RUN_ID_RE",
    "Run",
    "RunStore",
    "State",
    "default_root",
    "launch",
    "prepare",
]

# what a resume may change (Run.resume): where the run runs, not what it trains
RESUME_KEYS = ("distributed.procs_per_node", "distributed.nodes", "distributed.tensor_parallel",
               "train.micro_batch_size", "train.grad_accum")  # fmt: skip


class Run(RunFolder):
    """A handle on one run folder: what `RunFolder` reads, and resume and evaluate, which
    start jobs on it. Cheap to create; every read goes to disk."""

    def resume(self, overrides: list[str] | dict[str, Any] | None = None) -> Run:
        """Start the job again; the ranks continue from the newest complete checkpoint.

        `overrides` (`KEY=VALUE` or a dict) may change where it runs, and nothing else: the
        ranks (distributed.procs_per_node, distributed.nodes), distributed.tensor_parallel and
        the batch (train.micro_batch_size, train.grad_accum). On other ranks the worker loads
        the checkpoint through DeepSpeed's universal format; the data position continues by
        sample count. The previous values are kept in the `resume_overrides` event."""
        st = self.status()
        if not State(st["state"]).terminal:
            raise RunStateError(f"run {self.id} is {st['state']}; stop it before resuming")
        if st["state"] == State.COMPLETED.value:
            raise RunStateError(f"run {self.id} already completed; nothing to resume")
        if st["state"] == State.DAMAGED.value:
            raise RunStateError(f"run {self.id} cannot be resumed: {st['error']}")
        self._check_space()
        if overrides:
            self._relayout(overrides)
        from .launcher.supervisor import start

        start(self.path, resume=True)
        return self

    def _check_space(self) -> None:
        """Refuse a resume that could not write its next checkpoint (the same sentence the
        ranks give), rather than start ranks that will fail at it."""
        need = self.checkpoint_mb()
        if not has_room(self.path, need):
            raise DiskFull(disk_full_message(self.path / "checkpoints", "a checkpoint", need or None))

    def _relayout(self, overrides: list[str] | dict[str, Any]) -> None:
        import yaml

        from .spec import Spec, apply_overrides, deepspeed_config, split_override

        items = dict(overrides.items() if isinstance(overrides, dict) else map(split_override, overrides))
        if bad := sorted(set(items) - set(RESUME_KEYS)):
            raise UserError(f"resume cannot change {', '.join(bad)}: the run's model, data and schedule "
                            f"stay; it may change {', '.join(RESUME_KEYS)} (or start a new run from its spec)")  # fmt: skip
        raw = yaml.safe_load((self.path / SPEC_FILE).read_text(encoding="utf-8"))
        new = Spec.from_dict(apply_overrides(raw, items), check_files=False)  # SpecError names the key
        old, now = self.spec.to_dict(), new.to_dict()

        def value(d: dict[str, Any], key: str) -> Any:
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
            return d

        changes = {
            k: {"from": value(old, k), "to": value(now, k)} for k in items if value(old, k) != value(now, k)
        }
        if not changes:
            return
        if "distributed.nodes" in changes:
            from .cluster import CLUSTER_FILE, resolve, write_cluster

            cluster = resolve(new.distributed.nodes)
            if cluster is not None:
                write_cluster(self.path, cluster)
            else:
                (self.path / CLUSTER_FILE).unlink(missing_ok=True)
        record_event(self.path, Event.RESUME_OVERRIDES, changes=changes)
        write_json_atomic(self.path / DS_CONFIG_FILE, deepspeed_config(new, self.id))
        tmp = self.path / ".spec.yaml.tmp"
        tmp.write_text(new.to_yaml(), encoding="utf-8")
        os.replace(tmp, self.path / SPEC_FILE)
        self.__dict__.pop("spec", None)

    def evaluate(self, wait: bool = False, timeout: float | None = None, **params: Any) -> Any:
        """Evaluate this run's final model (or `checkpoint=`) as a detached job; see
        `jupyter_llm.evaluation.evaluate` for the parameters. Returns the Evaluation."""
        from .evaluation import evaluate

        return evaluate(self, wait=wait, timeout=timeout, **params)

    def evaluations(self) -> list[Any]:
        from .evaluation import evaluations

        return evaluations(self)

    def report(self, to: list[str] | str | None = None) -> list[str]:
        """Send this run to TensorBoard, MLflow, W&B or CSV (default: the spec's report_to):
        what the target has not received yet. A line per target says what was sent and how to
        open it (`tensorboard --logdir …`, `mlflow ui …`, `wandb sync …`)."""
        from .report import report

        return report(self, to)

    @property
    def model_card(self) -> str | None:
        """final/README.md, the model card (written when the run completed; updated by evaluations)."""
        from .folder import CARD_FILE, FINAL_DIR

        path = self.path / FINAL_DIR / CARD_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def summary(self) -> str:
        """The run in a few lines of text (state, step, loss, ETA or error)."""
        from .summary import run_text

        return run_text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


class RunStore(FolderStore[Run]):
    """All runs under one root folder."""

    run_class = Run


def launch(
    spec: Any,
    overrides: list[str] | Mapping[str, Any] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    job: str = "train",
    transform: Callable[[str], Any] | None = None,
    records: Mapping[str, Mapping[str, Any]] | None = None,
) -> Run:
    """Validate `spec` (Spec, dict, YAML text or path), create its run folder and start it.

    Returns at once with the `Run` handle (or after the run ends with `wait=True`).
    Spec problems raise `SpecError` before anything is written or started. `job="prepare"`
    runs only the data step (tokenizer, cleaning, packing into the cache), detached too.
    `transform(text) -> str | None | list[str]` is applied to every document before cleaning;
    it travels to the job with cloudpickle, so a function defined in a notebook works.
    `records` are JSON files written into the folder before the job starts (a sweep's
    sweep.json: what the trial belongs to, read by its reports from the start).
    """
    from .spec import Spec

    spec = Spec.load(spec, overrides)
    if transform is not None and not callable(transform):
        raise UserError(
            f"transform must be a function str -> str | None | list[str], not {type(transform).__name__}"
        )
    from .cluster import resolve

    cluster = resolve(spec.distributed.nodes) if job == "train" else None  # unknown names fail here
    plan = None
    if job == "train" and "auto" in (spec.distributed.zero_stage, spec.distributed.offload):
        from .preflight import fit_spec

        spec, plan = fit_spec(spec)  # DoesNotFit (how much is missing, what would fit) before anything
    if job == "train" and spec.distributed.tensor_parallel > 1:
        from .preflight import check_tensor_parallel

        check_tensor_parallel(spec, local=cluster is None)
    if (
        job == "train"
        and spec.distributed.offload == "nvme"
        and cluster is None
        and spec.distributed.nvme_path
    ):
        from .fit import nvme_check

        _, problem = nvme_check(spec.distributed.nvme_path)
        if problem:
            raise UserError(f"distributed.nvme_path: {problem}")
    if job == "train" and spec.report_to:
        from .report import check_installed

        check_installed(spec.report_to)  # at launch, not as a crash at the end
    run = RunStore(root).create(spec, job=job)
    if plan is not None:
        record = plan.to_dict()
        write_json_atomic(run.path / "fit.json", record)
        record_event(run.path, Event.FITTED, **record["chosen"], reason=plan.reason)
    if cluster is not None:
        from .cluster import write_cluster

        write_cluster(run.path, cluster)  # what this run uses, also when it is resumed
    if pipeline := os.environ.get("JUPYTER_LLM_PIPELINE"):  # launched by a pipeline stage's notebook
        write_json_atomic(run.path / "pipeline.json",
                          {"pipeline": pipeline, "stage": os.environ.get("JUPYTER_LLM_PIPELINE_STAGE")})  # fmt: skip
    for name, record in (records or {}).items():
        write_json_atomic(run.path / name, dict(record))
    if transform is not None:
        import cloudpickle

        (run.path / "transform.pkl").write_bytes(cloudpickle.dumps(transform))
    from .launcher.supervisor import start

    start(run.path)
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


class _CallableModule(types.ModuleType):
    """`jupyter_llm.runs` is both this module and the public `runs()` listing.

    Importing the submodule rebinds the package attribute `runs` to the module, so the
    module itself answers the call: `jupyter_llm.runs()` lists runs, `jupyter_llm.runs.Run`
    is the handle class.
    """

    def __call__(self, root: str | os.PathLike[str] | None = None) -> list[Run]:
        return RunStore(root).list()


sys.modules[__name__].__class__ = _CallableModule
