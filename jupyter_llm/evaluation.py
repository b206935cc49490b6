"""Evaluation of a run's final model or a checkpoint, as a detached job; and comparisons.

    ev = run.evaluate(prompts=["ROMEO:"], references="qa.jsonl")    # returns at once
    ev.wait(); ev.result            # eval.json: perplexity, masked accuracy, BLEU, ROUGE, ...
    jupyter_llm.compare([a, b])     # their latest results side by side (table and bar chart)

Each evaluation is a folder `RUN/evals/<id>/` (request.json, status.json, eval.log, eval.json,
samples.jsonl); the newest completed result is also copied to `RUN/eval.json`. The job is one
process (`python -m jupyter_llm.train.evaluate EVAL_DIR`) in a session of its own that reports
its own state; a reader that finds it gone while "running" reports it failed. Nothing here
imports torch.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .detach import DetachedJob
from .errors import RunStateError, SpecError, UserError
from .files import read_json, read_jsonl, write_json_atomic
from .folder import RunFolder, RunFolders, State
from .spec import EvalSpec, Spec, eval_problems

METRICS = ["ppl", "loss", "masked_accuracy", "bleu", "rouge1", "rouge2", "rougeL"]  # the comparison's columns


class Evaluation(DetachedJob):
    """Handle of one evaluation folder."""

    what = "evaluation process"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self.run = RunFolder(self.path.parent.parent)

    def __repr__(self) -> str:
        return f"Evaluation({self.run.id}/{self.id}: {self.state})"

    @property
    def request(self) -> EvalSpec:
        return EvalSpec.model_validate(read_json(self.path / "request.json") or {})

    @property
    def result(self) -> dict[str, Any] | None:
        """eval.json once the evaluation completed."""
        return read_json(self.path / "eval.json")

    def samples(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "samples.jsonl")[0]

    def stop(self) -> str:
        """SIGTERM to the recorded evaluation process (verified by its start time)."""
        st = self.status()
        if State(st["state"]).terminal:
            return str(st["state"])
        if self.alive(st):
            os.kill(int(st["pid"]), signal.SIGTERM)
        return "stopping"

    def log_tail(self, n: int = 20) -> list[str]:
        try:
            return (self.path / "eval.log").read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def summary(self) -> str:
        st, res = self.status(), self.result
        text = f"{self.run.id} evaluation {self.id}: {st['state']}"
        if res:
            text += "\n" + "\n".join(f"  {k:<16} {v}" for k, v in result_rows(res))
        if st.get("error"):
            text += f"\n  error: {st['error']}"
        return text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())

    def _repr_html_(self) -> str:
        st, res = self.status(), self.result
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in result_rows(res or {}))  # fmt: skip
        samples = "".join(
            f"<tr><td><pre>{html.escape(s['prompt'])}</pre></td><td><pre>{html.escape(s['output'])}</pre></td>"
            f"<td><pre>{html.escape(s.get('reference') or '')}</pre></td></tr>"
            for s in self.samples()[:8]
        )
        if samples:
            samples = f"<h4>samples</h4><table><tr><th>prompt</th><th>output</th><th>reference</th></tr>{samples}</table>"
        err = (
            f'<div style="color:var(--jp-error-color1, #c62828)">{html.escape(str(st["error"]))}</div>'
            if st.get("error")
            else ""
        )
        return (f"<div><b>{html.escape(self.run.id)}</b> evaluation {html.escape(self.id)}: "
                f"<b>{html.escape(st['state'])}</b>{err}<table>{rows}</table>{samples}</div>")  # fmt: skip


def result_rows(res: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value) rows of an eval.json."""
    rows = [("checkpoint", str(res.get("checkpoint", ""))), ("step", str(res.get("step", "")))]
    p = res.get("perplexity") or {}
    if p:
        rows += [("perplexity", f"{p['ppl']:.4f}"), ("loss (nats/token)", f"{p['loss']:.4f}"),
                 ("tokens", f"{p['tokens']:,}"), ("held-out data", str(p["source"]))]  # fmt: skip
    m = res.get("masked") or {}
    if m:
        rows += [("masked accuracy", f"{m['accuracy']:.4f}"), ("masked tokens", f"{m['tokens']:,}")]
    for k in ("bleu", "rouge1", "rouge2", "rougeL"):
        if res.get(k) is not None:
            rows.append((k, f"{res[k]:.4f}"))
    if res.get("samples"):
        rows.append(("samples", str(res["samples"])))
    return rows


def _new_id(checkpoint: Any) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{stamp}-{'step' + str(checkpoint) if isinstance(checkpoint, int) else checkpoint}"


def evaluate(
    run: RunFolder | str,
    request: EvalSpec | Mapping[str, Any] | None = None,
    *,
    wait: bool = False,
    timeout: float | None = None,
    **params: Any,
) -> Evaluation:
    """Start an evaluation of `run` (its final model by default) as a detached job.

    Parameters are those of the spec's `eval:` section (`EvalSpec`): checkpoint ("final",
    "latest" or a step), files, max_blocks, prompts, references (JSONL), prompt_field,
    reference_field, max_new_tokens, temperature (0: greedy), top_k, top_p, seed, batch_size.
    """
    run = run if isinstance(run, RunFolder) else RunFolders().get(run)
    raw = {**(request.model_dump() if isinstance(request, EvalSpec) else dict(request or {})), **params}
    try:
        req = EvalSpec.model_validate(raw, context={"base_dir": Path.cwd()})
    except Exception as e:
        from pydantic import ValidationError

        from .spec import validation_problems

        if isinstance(e, ValidationError):
            raise SpecError(validation_problems(e)) from None
        raise
    spec = run.spec
    if problems := eval_problems(req, spec.model.task):
        raise SpecError(problems)
    _check_model(run, spec, req)
    path = run.path / "evals" / _new_id(req.checkpoint)
    path.mkdir(parents=True)
    write_json_atomic(path / "request.json", req.model_dump(mode="json"))
    write_json_atomic(path / "status.json", {"state": "created", "created_at": _now()})
    with open(path / "eval.log", "ab") as log:
        subprocess.run([sys.executable, "-m", "jupyter_llm.train.evaluate", str(path), "--detach"],
                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
    ev = Evaluation(path)
    if wait:
        ev.wait(timeout)
    return ev


def _check_model(run: RunFolder, spec: Spec, req: EvalSpec) -> None:
    """Fail before starting when the model to evaluate is not there."""
    if req.checkpoint == "final":
        if run.final_model is None:
            raise RunStateError(
                f"run {run.id} has no final model ({run.state}); evaluate a checkpoint: latest or a step "
                f"(saved: {_steps(run) or 'none'}) -- `--checkpoint latest` in the CLI, "
                "checkpoint='latest' in Python"
            )
        return
    steps = _steps(run)
    if not steps:
        raise RunStateError(f"run {run.id} has no complete checkpoint; evaluate its final model instead")
    if isinstance(req.checkpoint, int) and req.checkpoint not in steps:
        raise UserError(f"run {run.id} has no complete checkpoint at step {req.checkpoint}; it has {steps}")


def _steps(run: RunFolder) -> list[int]:
    from .folder import CKPT_MARKER

    return [int((read_json(p / CKPT_MARKER) or {})["step"]) for p in run.checkpoints()]


def _now() -> str:
    from .files import now_iso

    return now_iso()


def evaluations(run: RunFolder | str) -> list[Evaluation]:
    """A run's evaluations, oldest first."""
    run = run if isinstance(run, RunFolder) else RunFolders().get(run)
    root = run.path / "evals"
    return (
        [Evaluation(p) for p in sorted(root.iterdir()) if (p / "request.json").is_file()]
        if root.is_dir()
        else []
    )


# -- comparison ---------------------------------------------------------------------------


TRAIN_METRICS = ["final_loss", "best_val_loss"]  # from the runs' metrics.jsonl


class Comparison:
    """Several runs side by side: their evaluations (the latest RUN/eval.json), their final
    and best training numbers, and where their specs differ. Shown in a notebook as a table,
    bars per metric and the runs' curves overlaid (`jupyter_llm.widgets.CompareView`)."""

    def __init__(self, runs: Iterable[RunFolder | str]):
        self.runs = [r if isinstance(r, RunFolder) else RunFolders().get(r) for r in runs]
        self.rows: list[dict[str, Any]] = [_comparison_row(run) for run in self.runs]
        self.metrics = [k for k in METRICS if any(r[k] is not None for r in self.rows)]
        self.train_metrics = [k for k in TRAIN_METRICS if any(r[k] is not None for r in self.rows)]
        self.unevaluated = [r["name"] for r in self.rows if r["checkpoint"] is None]
        specs = [_flat_spec(run) for run in self.runs]
        keys = sorted({k for s in specs for k in s} - {"name"})
        missing = object()
        self.spec_diff: dict[str, list[Any]] = {
            k: [s.get(k) for s in specs] for k in keys if len({repr(s.get(k, missing)) for s in specs}) > 1
        }

    def labels(self) -> list[str]:
        """A short label per run: its name, with the id's end where names repeat."""
        names = [r["name"] for r in self.rows]
        return [
            n if names.count(n) == 1 else f"{n}·{r['run'][-4:]}"
            for n, r in zip(names, self.rows, strict=True)
        ]

    def __repr__(self) -> str:
        cols = [*self.train_metrics, *self.metrics]
        lines = [f"{'RUN':<44} {'STATE':<10} " + " ".join(f"{k:>14}" for k in cols)]
        for r in self.rows:
            lines.append(f"{r['run']:<44} {r['state']:<10} " + " ".join(f"{_num(r[k]):>14}" for k in cols))
        if self.unevaluated and self.metrics:
            lines.append(f"not evaluated: {', '.join(self.unevaluated)} (jupyter-llm eval RUN evaluates one)")
        if self.spec_diff:
            lines.append("where the specs differ:")
            lines += [
                f"  {k}: " + " | ".join(json.dumps(v) for v in vals) for k, vals in self.spec_diff.items()
            ]
        return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if v is None else format(v, ".4f")


def _comparison_row(run: RunFolder) -> dict[str, Any]:
    from .summary import duration_s

    res = read_json(run.path / "eval.json") or {}
    p, m = res.get("perplexity") or {}, res.get("masked") or {}
    st = run.status()
    lines = run.metrics()
    train = [x["loss"] for x in lines if x.get("loss") is not None]
    val = [x["val_loss"] for x in lines if x.get("val_loss") is not None]
    return {"run": run.id, "name": st.get("name") or run.id, "state": st["state"],
            "steps": max((int(x.get("step", 0)) for x in lines), default=0), "duration_s": duration_s(st),
            "final_loss": train[-1] if train else None, "best_val_loss": min(val) if val else None,
            "checkpoint": res.get("checkpoint"), "ppl": p.get("ppl"), "loss": p.get("loss"),
            "masked_accuracy": m.get("accuracy"), **{k: res.get(k) for k in ("bleu", "rouge1", "rouge2", "rougeL")}}  # fmt: skip


def _flat_spec(run: RunFolder) -> dict[str, Any]:
    try:
        data = run.spec.to_dict()
    except Exception:  # a damaged folder: nothing to compare
        return {}
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(data, "")
    return out


def compare(runs: Iterable[RunFolder | str]) -> Comparison:
    """Runs side by side: latest evaluation (RUN/eval.json), final and best losses, spec diff."""
    return Comparison(runs)


# -- command line and magic arguments ---------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The evaluation flags shared by `jupyter-llm eval` and `%llm_eval`."""
    ap.add_argument("run", nargs="?", help="run id, id prefix or name (default: newest)")
    ap.add_argument("--checkpoint", default="final", help="final (default), latest, or a checkpoint's step")
    ap.add_argument(
        "--files", nargs="+", metavar="FILE", help="held-out text files (default: the validation split)"
    )
    ap.add_argument("--max-blocks", type=int, help="at most this many blocks for perplexity")
    ap.add_argument(
        "--prompt", dest="prompts", action="append", default=[], help="generate from it (repeatable)"
    )
    ap.add_argument("--references", metavar="JSONL", help="prompt → reference lines: BLEU and ROUGE")
    ap.add_argument("--prompt-field", default="prompt")
    ap.add_argument("--reference-field", default="reference")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait", action="store_true", help="block until the evaluation ends")


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    ck = args.checkpoint
    req = {"checkpoint": int(ck) if str(ck).isdigit() else ck, "files": args.files, "max_blocks": args.max_blocks,
           "prompts": args.prompts, "references": args.references, "prompt_field": args.prompt_field,
           "reference_field": args.reference_field, "max_new_tokens": args.max_new_tokens,
           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    return {k: v for k, v in req.items() if v is not None}
