"""`jupyter-llm` (also `jupyter llm`): a thin shell over the Python API.

User mistakes exit with code 2 and a one-paragraph message; `train --wait` and
`resume --wait` exit 0 only when the run completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import SpecError, UserError
from .folder import Event, State
from .runs import Run, RunStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jupyter-llm",
        description="Train language models with detached DeepSpeed jobs; every run is a folder.",
    )
    p.add_argument("--root", help="runs root (default: $JUPYTER_LLM_HOME/runs, else ./llm-runs)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="validate a spec and start a run")
    t.add_argument("spec", help="YAML spec file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.lr=3e-4 (repeatable)")  # fmt: skip
    t.add_argument("--wait", action="store_true", help="follow the run; exit 0 only if it completed")
    t.add_argument("--dry-run", action="store_true",
                   help="validate; print the DeepSpeed config, the commands and the pre-flight (exit 1 if it fails)")  # fmt: skip

    pr = sub.add_parser("prepare", help="prepare a spec's data (tokenizer, cleaning, packing) as a job")
    pr.add_argument("spec", help="YAML spec file")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--wait", action="store_true", help="wait and print the data stats as JSON")

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--json", action="store_true")

    s = sub.add_parser("status", help="state and latest metrics of a run")
    s.add_argument("run", nargs="?", help="run id, id prefix or name (default: newest)")
    s.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", help="log tail of a run")
    lg.add_argument("run", nargs="?")
    lg.add_argument("-n", type=int, default=40, help="lines (default 40)")
    lg.add_argument("--rank", type=int, help="a rank's log instead of the launcher's")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")

    st = sub.add_parser("stop", help="stop a run gracefully (it saves a checkpoint first)")
    st.add_argument("run", nargs="?")
    st.add_argument("--wait", action="store_true")

    rs = sub.add_parser("resume", help="continue a stopped or failed run from its newest checkpoint")
    rs.add_argument("run", nargs="?")
    rs.add_argument("--wait", action="store_true")
    rs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="continue on other ranks: distributed.procs_per_node, distributed.nodes, "
                         "distributed.tensor_parallel, train.micro_batch_size, train.grad_accum")  # fmt: skip

    from .evaluation import add_arguments

    ev = sub.add_parser("eval", help="evaluate a run's final model or a checkpoint (a detached job)")
    add_arguments(ev)
    ev.add_argument("--json", action="store_true", help="with --wait: print eval.json")

    rep = sub.add_parser(
        "report", help="send a run to TensorBoard, MLflow, W&B or CSV (default: its report_to)"
    )
    rep.add_argument("run", nargs="?")
    rep.add_argument("--to", action="append", metavar="TARGET",
                     help="tensorboard, mlflow, wandb or csv; repeat it or separate with commas")  # fmt: skip

    cmp = sub.add_parser("compare", help="the latest evaluation of several runs side by side")
    cmp.add_argument("runs", nargs="+")
    cmp.add_argument("--json", action="store_true")

    sw = sub.add_parser("sweep", help="start a hyperparameter sweep (each trial its own run)")
    sw.add_argument("file", nargs="?", help="sweep YAML (base, space, objective, trials, parallel, ...)")
    sw.add_argument("--resume", metavar="SWEEP", help="restart the controller of a killed or stopped sweep")
    sw.add_argument("--stop", metavar="SWEEP", help="stop a sweep (its running trials are stopped)")
    sw.add_argument("--status", metavar="SWEEP", nargs="?", const="", help="trials and best of a sweep")
    sw.add_argument("--wait", action="store_true", help="follow until the sweep ends; exit 0 if completed")

    pl = sub.add_parser("pipeline", help="papermill pipelines of notebooks (prepare → train → evaluate)")
    plsub = pl.add_subparsers(dest="pipeline_cmd", required=True, metavar="ACTION")
    plr = plsub.add_parser("run", help="run every stage of a pipeline file")
    plr.add_argument("file", help="pipeline YAML (stages, parameters, hand-offs)")
    plr.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE",
                     help="override a shared parameter (repeatable)")  # fmt: skip
    plr.add_argument("--out", help="the pipeline folder (default: <runs root>/_pipelines/<id>)")
    plr.add_argument("--resume", metavar="FOLDER", help="continue a failed pipeline from its failed stage")
    plr.add_argument("--allow-extra", action="store_true", help="let through parameters no notebook declares")

    rp = sub.add_parser("reproduce", help="rerun a run or a pipeline folder from its record; compare losses")
    rp.add_argument("target", help="run id / name, or a pipeline folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = RunStore(args.root)
    try:
        rc = int(COMMANDS[args.cmd](args, store) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return rc
    except SpecError as e:
        print(f"jupyter-llm: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"jupyter-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `jupyter-llm runs | head -1`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _train(args: argparse.Namespace, store: RunStore) -> int:
    from .runs import launch
    from .spec import Spec

    spec = Spec.from_file(args.spec, args.overrides)
    if args.dry_run:  # the spec, DeepSpeed config, every command and the pre-flight (nodes included)
        from .preflight import dry_run

        plan = dry_run(spec)  # with the memory estimate (a few seconds: a subprocess builds the model)
        print(plan)
        return 0 if plan.ok else 1
    run = launch(spec, root=store.root)
    print(run.id)
    sys.stdout.flush()
    return _follow(run) if args.wait else 0


def _prepare(args: argparse.Namespace, store: RunStore) -> int:
    from .runs import prepare
    from .spec import Spec

    run = prepare(Spec.from_file(args.spec, args.overrides), root=store.root)
    print(run.id)
    sys.stdout.flush()
    if not args.wait:
        return 0
    from .terminal import TerminalView

    with _goes_on(run), TerminalView(run, sys.stderr):
        run.wait()
    st = run.status()
    if st["state"] != State.COMPLETED.value:
        print(f"{run.id}: {st['state']}" + (f" ({st['error']})" if st.get("error") else ""), file=sys.stderr)
        return 1
    ready = next(e for e in reversed(run.events()) if e["event"] == Event.DATA_READY)
    print(json.dumps({k: v for k, v in ready.items() if k not in ("time", "event")}, indent=1))
    return 0


def _follow(run: Run) -> int:
    """The run's start-up phases and progress (a bar on a terminal, lines when piped) until it
    ends; exit code 0 only for a completed run."""
    from .terminal import TerminalView

    with _goes_on(run), TerminalView(run, sys.stderr):
        run.wait()
    st = run.status()
    print(f"{run.id}: {st['state']}" + (f" ({st['error']})" if st.get("error") else ""), file=sys.stderr)
    return 0 if st["state"] == State.COMPLETED.value else 1


def _row(run: Run) -> dict[str, Any]:
    st = run.status()
    metrics = run.metrics()
    last: dict[str, Any] = next((m for m in reversed(metrics) if "loss" in m), {})
    last_val: dict[str, Any] = next((m for m in reversed(metrics) if "val_loss" in m), {})
    try:
        total = run.spec.train.max_steps
    except Exception:  # a damaged spec.yaml must not break the listing
        total = None
    return {
        "run_id": run.id, "name": st.get("name"), "state": st["state"], "step": last.get("step"),
        "max_steps": total, "loss": last.get("loss"), "val_loss": last_val.get("val_loss"),
        "started_at": st.get("started_at"), "ended_at": st.get("ended_at"), "error": st.get("error"),
        "restarts": st.get("restarts") or None,
        "last_restart": (st.get("last_restart") or {}).get("reason") if st.get("restarts") else None,
        "path": str(run.path),
    }  # fmt: skip


def _runs(args: argparse.Namespace, store: RunStore) -> int:
    rows = [_row(r) for r in store.list()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs under {store.root}")
        return 0
    print(f"{'RUN':<44} {'STATE':<10} {'STEP':>11} {'LOSS':>8} {'STARTED':<19}")
    for r in rows:
        step = f"{r['step'] or 0}/{r['max_steps'] or '?'}"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        started = (r["started_at"] or "")[:19].replace("T", " ")
        print(f"{r['run_id']:<44} {r['state']:<10} {step:>11} {loss:>8} {started:<19}")
        if r["state"] == "damaged":
            print(f"  {r['error']}")
    return 0


def _status(args: argparse.Namespace, store: RunStore) -> int:
    run = store.get(args.run)
    row = _row(run)
    if args.json:
        print(json.dumps({**run.status(), **row}, indent=1))
        return 0
    for k, v in row.items():
        if v is not None:
            print(f"{k:>10}: {v}")
    return 0


def _logs(args: argparse.Namespace, store: RunStore) -> int:
    run = store.get(args.run)
    if not args.follow:
        for line in run.logs(args.n, args.rank):
            print(line, flush=True)
        return 0
    from .terminal import TerminalView

    # the bar shares the screen only when both streams are the terminal; piped, the lines stay clean
    view = TerminalView(run, sys.stderr, tty=sys.stderr.isatty() and sys.stdout.isatty(), metrics=False)
    with _goes_on(run), view:
        for line in run.logs(args.n, args.rank, follow=True):
            view.write(line, sys.stdout)
    return 0


@contextlib.contextmanager
def _goes_on(run: Run) -> Iterator[None]:
    """Ctrl-C stops the following, never the run: say so, and how to stop or follow it."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\n{run.id} goes on in the background ({run.state}); `jupyter-llm stop {run.id}` stops it, "
              f"`jupyter-llm logs -f {run.id}` follows it again", file=sys.stderr)  # fmt: skip
        raise


def _stop(args: argparse.Namespace, store: RunStore) -> int:
    run = store.get(args.run)
    state = run.stop(wait=args.wait)
    print(f"{run.id}: {state}")
    return 0


def _resume(args: argparse.Namespace, store: RunStore) -> int:
    run = store.get(args.run).resume(args.overrides)
    print(run.id)
    sys.stdout.flush()
    return _follow(run) if args.wait else 0


def _eval(args: argparse.Namespace, store: RunStore) -> int:
    from .evaluation import evaluate, request_from_args

    ev = evaluate(store.get(args.run), request_from_args(args))
    print(f"{ev.run.id}/evals/{ev.id}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    state = ev.wait()
    if state != "completed":
        print(ev.summary(), file=sys.stderr)
        print("\n".join(ev.log_tail(15)), file=sys.stderr)
        return 1
    print(json.dumps(ev.result, indent=1) if args.json else ev.summary())
    return 0


def _compare(args: argparse.Namespace, store: RunStore) -> int:
    from .evaluation import Comparison

    c = Comparison([store.get(r) for r in args.runs])
    print(json.dumps(c.rows, indent=1) if args.json else repr(c))
    return 0


def _report(args: argparse.Namespace, store: RunStore) -> int:
    lines = store.get(args.run).report(args.to)
    print("\n".join(lines))
    return 1 if any(": failed: " in line for line in lines) else 0


def _sweep(args: argparse.Namespace, store: RunStore) -> int:
    from .sweep import get_sweep, sweep

    if args.status is not None:
        print(get_sweep(args.status or None, store.root).summary())
        return 0
    if args.stop:
        s = get_sweep(args.stop, store.root)
        print(f"{s.id}: {s.stop()}")
        return 0
    if args.resume:
        s = get_sweep(args.resume, store.root).resume()
    elif args.file:
        s = sweep(args.file, root=store.root)
    else:
        raise UserError("give a sweep file, or --resume/--stop/--status SWEEP")
    print(s.id)
    sys.stdout.flush()
    if not args.wait:
        return 0
    state = s.wait()
    print(s.summary(), file=sys.stderr)
    return 0 if state == "completed" else 1


def _pipeline(args: argparse.Namespace, store: RunStore) -> int:
    from .pipeline import PipelineError, run, summary_text

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        # on a terminal, papermill's own bar of each stage's cells (tqdm); piped, the stage lines
        folder = run(args.file, args.params, out=args.out, resume=args.resume, log=log,
                     allow_extra=args.allow_extra, progress=sys.stderr.isatty())  # fmt: skip
    except PipelineError as e:
        print(f"jupyter-llm: {e}\n{summary_text(e.folder)}", file=sys.stderr)
        return 1
    print(summary_text(folder))
    return 0


def _reproduce(args: argparse.Namespace, store: RunStore) -> int:
    from .pipeline import reproduce

    res = reproduce(args.target, root=store.root, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=1))
    return 0 if res["equal"] else 1


COMMANDS = {
    "train": _train,
    "prepare": _prepare,
    "runs": _runs,
    "status": _status,
    "logs": _logs,
    "stop": _stop,
    "resume": _resume,
    "eval": _eval,
    "compare": _compare,
    "report": _report,
    "sweep": _sweep,
    "pipeline": _pipeline,
    "reproduce": _reproduce,
}

if __name__ == "__main__":
    sys.exit(main())
