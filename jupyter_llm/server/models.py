"""The REST API's bodies as pydantic models, the one source of their shape: the handlers build
their replies from them, and `make docs` (docs/generate.py) writes the OpenAPI file's schemas
(`openapi.yaml`) and the labextension's TypeScript types (`labextension/src/api.ts`) from them;
tests/test_docs.py fails when either is stale. status.json (`folder.RunStatus`) and a failure
(`launcher.watch.Failure`) are the run folder's own models, shown here as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..folder import RunStatus, State
from ..launcher.watch import Failure


class Reply(BaseModel):
    """A body the server sends: every field is always there (null when unknown)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class Problem(Reply):
    """One thing wrong with a spec: the field's dotted path, what was given, what to do."""

    field: str
    given: str
    message: str


class ErrorReply(Reply):
    """A 4xx answer: bad input, an unknown run, or a state that forbids the action."""

    message: str
    problems: list[Problem] | None = None


class Startup(Reply):
    """Until an attempt's first metric: what it is doing (preparing data 45%, building the model)."""

    phase: str
    detail: str = ""


class LastRestart(Reply):
    """The newest automatic restart (train.max_restarts): when, why, and its class in words."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)  # merged with Reply's

    time: str | None = None
    reason: str | None = None
    class_: str | None = Field(None, alias="class")


class SweepRef(Reply):
    """The sweep and trial a run belongs to (its sweep.json, written by the sweep controller)."""

    model_config = ConfigDict(extra="allow")  # merged with Reply's

    sweep_id: str
    sweep_path: str | None = None
    trial: int
    params: dict[str, Any] = {}


class PipelineRef(Reply):
    """The pipeline and stage that launched a run (its pipeline.json)."""

    model_config = ConfigDict(extra="allow")  # merged with Reply's

    pipeline: str
    stage: str | None = None


class RunRow(Reply):
    """A run as GET runs lists it."""

    run_id: str
    name: str | None = None
    job: Literal["train", "prepare"] = "train"
    state: State
    step: int = 0
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    eta_s: float | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    error: str | None = None
    restarts: int = Field(0, description="automatic restarts so far (train.max_restarts)")
    last_restart: LastRestart | None = None
    startup: Startup | None = None
    sweep: SweepRef | None = None
    pipeline: PipelineRef | None = None


class RunList(Reply):
    runs: list[RunRow]
    root: str = Field(description="the runs root folder")


class Sample(Reply):
    """Text generated during training (train.sample_every)."""

    model_config = ConfigDict(extra="allow")  # merged with Reply's

    step: int
    prompt: str
    output: str


class RunDetail(RunRow):
    """GET runs/{id}: the row, with status.json, the spec, the manifest, the overview (label,
    value pairs) and the newest training samples."""

    status: RunStatus
    spec: dict[str, Any]
    manifest: dict[str, Any] | None = None
    overview: list[tuple[str, str]] = []
    samples: list[Sample] = []


class Metrics(Reply):
    """metrics.jsonl lines from a byte offset on, and the offset to ask from next time."""

    metrics: list[dict[str, Any]]
    offset: int


class Logs(Reply):
    lines: list[str]
    rank: int | None = None


class ActionDone(Reply):
    """stop / resume: the run's state after the action; evaluate: the evaluation's id too."""

    run_id: str
    state: str
    eval_id: str | None = None


class Comparison(Reply):
    """GET compare: runs side by side, what %llm_compare shows, as data."""

    rows: list[dict[str, Any]]
    labels: list[str]
    metrics: list[str] = Field(description="the evaluation metrics any of the runs has")
    train_metrics: list[str]
    unevaluated: list[str] = Field(description="the runs with no evaluation yet")
    spec_diff: dict[str, list[Any]] = Field(
        description="dotted spec field -> each run's value, where they differ"
    )


class GenerationPiece(Reply):
    """One line of POST runs/{id}/generate's stream: a piece of the generated text."""

    text: str


class GenerationDone(Reply):
    """The stream's last line."""

    done: Literal[True] = True
    pieces: int | None = None
    seconds: float | None = None
    stopped: bool | None = None
    error: str | None = None


# every model the API answers with, in the order the schemas are written
MODELS: list[type[BaseModel]] = [
    ErrorReply, Problem, RunList, RunRow, RunDetail, RunStatus, Failure, Startup, LastRestart, SweepRef,
    PipelineRef, Sample, Metrics, Logs, ActionDone, Comparison, GenerationPiece, GenerationDone,
]  # fmt: skip


def schemas() -> dict[str, Any]:
    """The JSON Schema of every model, referring to each other as OpenAPI components."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema(
        [(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}"
    )
    defs = top["$defs"]
    return {m.__name__: defs[m.__name__] for m in MODELS} | {
        k: v for k, v in defs.items() if k not in {m.__name__ for m in MODELS}
    }
