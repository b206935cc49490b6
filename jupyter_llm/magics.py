"""IPython magics: parse, call the Python API, display. Nothing here trains or imports torch.

%load_ext jupyter_llm
%%llm_train [NAME] [--set k=v]... [--dry-run] [--wait]     (YAML spec body)
%llm_train SPEC [--set k=v]... [--dry-run] [--wait]        (path, or a variable: dict / Spec)
%llm_train --from RUN [--set k=v]...                       (clone an earlier run's spec)
%%llm_prepare / %llm_prepare SPEC [--wait]                 (the data step alone, detached)
    both take --transform FUNCTION: a notebook function applied to every document
%llm_runs · %llm_status [RUN] · %llm_logs [RUN] [-n N] [--rank R] [--follow]
%llm_stop [RUN] · %llm_resume [RUN] · %llm_attach [RUN]        (a Run shows as a live dashboard)
%llm_form [RUN] · %llm_dashboard RUN [RUN]...                  (spec form; overlaid dashboards)
%llm_eval [RUN] [--checkpoint C] [--prompt P]... [--references R.jsonl] [--wait] · %llm_compare RUN...
%%llm_sweep NAME (YAML: base, space, objective, trials, parallel, pruner) · %llm_sweep FILE
%llm_pipeline PIPELINE.yaml [-p key=value]... [--out DIR] [--resume DIR]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .errors import SpecError, UserError
from .runs import Run, RunStore


def _usage(fn: Any) -> Any:
    """Turn our user errors into short UsageErrors (no traceback)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            from .display import spec_error_text

            raise UsageError(spec_error_text(e)) from None
        except UserError as e:
            raise UsageError(str(e)) from None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _parse(magic: Any, line: str) -> Any:
    try:
        return parse_argstring(magic, line)
    except UsageError:
        raise
    except ValueError as e:  # shlex: unbalanced quotes
        raise UsageError(f"could not parse the arguments: {e}") from None


@magics_class
class LLMMagics(Magics):
    @property
    def store(self) -> RunStore:
        return RunStore()

    def _run(self, run_id: str | None) -> Run:
        return self.store.get(run_id)

    # -- train ----------------------------------------------------------------------------

    @line_cell_magic
    @magic_arguments()
    @argument("spec", nargs="?", help="cell magic: the run NAME; line magic: a spec path or a variable name")
    @argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
              help="dotted override, e.g. --set optim.lr=3e-4 (repeatable)")  # fmt: skip
    @argument("--from", dest="from_run", metavar="RUN", help="clone the spec of an earlier run")
    @argument("--dry-run", action="store_true", help="validate and show the plan; start nothing")
    @argument("--wait", action="store_true", help="block until the run ends")
    @argument("--transform", metavar="FUNCTION", help="a notebook function applied to every document")
    @_usage
    def llm_train(self, line: str, cell: str | None = None) -> Any:
        """Validate a spec and start a detached DeepSpeed run; returns its Run handle at once."""
        args = _parse(self.llm_train, line)
        spec = self._spec(args, cell, "llm_train")
        if args.dry_run:
            from .preflight import dry_run

            return dry_run(spec)
        from .runs import launch

        run = launch(spec, transform=self._transform(args.transform))
        if args.wait:
            run.wait()
        return run

    @line_cell_magic
    @magic_arguments()
    @argument("spec", nargs="?", help="cell magic: the run NAME; line magic: a spec path or a variable name")
    @argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    @argument("--from", dest="from_run", metavar="RUN", help="the spec of an earlier run")
    @argument("--wait", action="store_true", help="block until the data is ready")
    @argument("--transform", metavar="FUNCTION", help="a notebook function applied to every document")
    @_usage
    def llm_prepare(self, line: str, cell: str | None = None) -> Any:
        """Prepare a spec's data (tokenizer, cleaning, packing into the cache) as a detached
        job; a later %llm_train of the same spec starts from the cache."""
        from .runs import prepare

        args = _parse(self.llm_prepare, line)
        run = prepare(self._spec(args, cell, "llm_prepare"), transform=self._transform(args.transform))
        if args.wait:
            run.wait()
        return run

    def _transform(self, name: str | None) -> Any:
        if name is None:
            return None
        ns = self.shell.user_ns if self.shell is not None else {}
        if name not in ns:
            raise UsageError(f"--transform {name}: no such variable in the notebook")
        if not callable(ns[name]):
            raise UsageError(f"--transform {name}: a {type(ns[name]).__name__}, not a function")
        return ns[name]

    def _spec(self, args: Any, cell: str | None, magic: str) -> Any:
        """The Spec that a cell body, a path, a variable or --from RUN gives, with overrides."""
        from .spec import Spec

        overrides = list(args.overrides)
        if cell is not None:
            if args.from_run:
                raise UsageError("use either a YAML cell body or --from RUN, not both")
            if args.spec:
                overrides.append(f"name={args.spec}")
            return Spec.from_yaml(cell, overrides)
        if args.from_run:
            if args.spec:
                raise UsageError("use either SPEC or --from RUN, not both")
            return Spec.from_dict(self._run(args.from_run).spec.to_dict(), overrides)
        if args.spec:
            return Spec.load(self._resolve_spec(args.spec), overrides)
        raise UsageError(
            f"give a spec: %%{magic} with a YAML body, %{magic} path/to/spec.yaml, "
            f"%{magic} my_dict_variable, or %{magic} --from RUN"
        )

    def _resolve_spec(self, name: str) -> Any:
        ns = self.shell.user_ns if self.shell is not None else {}
        if name.isidentifier() and name in ns:
            value = ns[name]
            from .spec import Spec

            if isinstance(value, Spec | Mapping):
                return value
            if isinstance(value, str | os.PathLike):
                return value
            raise UsageError(f"{name} is a {type(value).__name__}; give a dict, a Spec or a path")
        if os.path.isfile(name):
            return Path(name)  # loaded with from_file: relative data paths resolve against its folder
        if name.isidentifier():
            raise UsageError(f"{name!r} is neither a variable in this notebook nor a file")
        raise UsageError(f"spec file not found: {name}")

    # -- runs -----------------------------------------------------------------------------

    @line_magic
    @_usage
    def llm_runs(self, line: str = "") -> Any:
        """Table of runs: id, name, state, step/total, last loss, started, duration."""
        from .display import RunsListing

        return RunsListing(self.store.list())

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?", help="run id, id prefix or name (default: newest)")
    @_usage
    def llm_status(self, line: str = "") -> Any:
        """State, progress and latest metrics of a run (a snapshot)."""
        args = _parse(self.llm_status, line)
        from IPython.display import HTML, Markdown, display

        from .card import as_markdown
        from .display import run_html

        run = self._run(args.run)
        card = run.model_card if run.state == "completed" else None
        if card is None:
            return HTML(run_html(run))
        display(HTML(run_html(run)))
        return Markdown(as_markdown(card))  # the model card, final/README.md

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?")
    @argument("-n", type=int, default=40, help="lines (default 40)")
    @argument("--rank", type=int, default=None, help="a rank's log instead of the launcher's")
    @argument("--follow", action="store_true", help="keep printing until the run ends")
    @_usage
    def llm_logs(self, line: str = "") -> None:
        """The tail of a run's log."""
        args = _parse(self.llm_logs, line)
        run = self._run(args.run)
        for ln in run.logs(args.n, args.rank, follow=args.follow):
            print(ln, flush=True)

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?")
    @_usage
    def llm_stop(self, line: str = "") -> str:
        """Ask a run to stop; its ranks save a checkpoint first."""
        run = self._run(_parse(self.llm_stop, line).run)
        return f"{run.id}: {run.stop()}"

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?")
    @argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="continue on other ranks (distributed.procs_per_node, tensor_parallel, ...)",
    )
    @_usage
    def llm_resume(self, line: str = "") -> Run:
        """Continue a stopped or failed run from its newest complete checkpoint."""
        args = _parse(self.llm_resume, line)
        return self._run(args.run).resume(args.overrides)

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?")
    @_usage
    def llm_attach(self, line: str = "") -> Run:
        """The Run handle of an existing run (after a kernel restart, say), shown live."""
        return self._run(_parse(self.llm_attach, line).run)

    @line_magic
    @_usage
    def llm_eval(self, line: str = "") -> Any:
        """Evaluate a run (final model or --checkpoint): perplexity, masked accuracy, samples,
        BLEU/ROUGE against --references; a detached job. `%llm_eval --help` lists the flags."""
        import argparse
        import shlex

        from .evaluation import add_arguments, evaluate, request_from_args

        ap = argparse.ArgumentParser(prog="%llm_eval", exit_on_error=False, add_help=False)
        add_arguments(ap)
        try:
            words = shlex.split(line)
            if "--help" in words or "-h" in words:
                ap.print_help()
                return None
            args = ap.parse_args(words)
        except (ValueError, argparse.ArgumentError, SystemExit) as e:
            raise UsageError(f"%llm_eval: {e}\n{ap.format_usage()}") from None
        ev = evaluate(self._run(args.run), request_from_args(args))
        if args.wait:
            ev.wait()
        return ev

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?")
    @argument("--checkpoint", default="final", help="final (default), latest or a checkpoint's step")
    @argument("--compare", default=None, metavar="CHECKPOINT_OR_RUN",
              help="a second pane: another checkpoint of the run (a step, latest) or another run")  # fmt: skip
    @argument("--idle-timeout", type=float, default=900.0, help="seconds before an unused generator ends")
    @_usage
    def llm_chat(self, line: str = "") -> Any:
        """A playground for a trained model: prompt (or chat) box, generation settings, tokens
        streamed from a generator process of its own (the kernel never imports torch)."""
        from .widgets.playground import Playground

        args = _parse(self.llm_chat, line)
        return Playground(self._run(args.run), args.checkpoint, args.compare, args.idle_timeout)

    @line_cell_magic
    @magic_arguments()
    @argument("name", nargs="?", help="cell magic: the sweep's name; line magic: a sweep YAML file")
    @argument("--wait", action="store_true", help="block until the sweep ends")
    @_usage
    def llm_sweep(self, line: str, cell: str | None = None) -> Any:
        """A hyperparameter sweep (YAML: base, space, objective, trials, parallel, sampler,
        pruner, budget_s, storage); each trial is its own detached run. Shows its live view."""
        from .sweep import sweep

        args = _parse(self.llm_sweep, line)
        if cell is None:
            if not args.name:
                raise UsageError("give a sweep: %%llm_sweep NAME with a YAML body, or %llm_sweep sweep.yaml")
            if not os.path.isfile(args.name):
                raise UsageError(f"sweep file not found: {args.name}")
            s = sweep(Path(args.name))
        else:
            from .inputs import load_yaml

            body = load_yaml(cell, "the sweep") or {}
            if not isinstance(body, Mapping):
                raise UsageError("the sweep body must be a mapping: base, space, objective, trials, ...")
            s = sweep({**body, **({"name": args.name} if args.name else {})})
        if args.wait:
            s.wait()
        return s

    @line_magic
    @magic_arguments()
    @argument("file", help="pipeline YAML")
    @argument(
        "-p", dest="params", action="append", default=[], metavar="KEY=VALUE", help="a shared parameter"
    )
    @argument("--out", help="the pipeline folder")
    @argument("--resume", metavar="FOLDER", help="continue a failed pipeline")
    @argument("--allow-extra", action="store_true", help="let through parameters no notebook declares")
    @_usage
    def llm_pipeline(self, line: str = "") -> str:
        """Run a papermill pipeline (prepare → train → evaluate notebooks) to the end."""
        from .pipeline import PipelineError, run, summary_text

        args = _parse(self.llm_pipeline, line)
        try:
            folder = run(args.file, args.params, out=args.out, resume=args.resume, log=print,
                         allow_extra=args.allow_extra)  # fmt: skip
        except PipelineError as e:
            raise UsageError(f"{e}\n{summary_text(e.folder)}") from None
        return summary_text(folder)

    @line_magic
    @magic_arguments()
    @argument("runs", nargs="+", help="run ids, id prefixes or names")
    @_usage
    def llm_compare(self, line: str = "") -> Any:
        """The latest evaluation of several runs side by side (table and bar chart)."""
        from .evaluation import compare

        return compare([self._run(r) for r in _parse(self.llm_compare, line).runs])

    @line_magic
    @magic_arguments()
    @argument("run", nargs="?", help="an earlier run whose spec the form starts from")
    @_usage
    def llm_form(self, line: str = "") -> Any:
        """A form for a spec, validated as you type; Launch starts it and shows its dashboard."""
        from .widgets import SpecForm

        args = _parse(self.llm_form, line)
        return SpecForm(self._run(args.run) if args.run else None)

    @line_magic
    @magic_arguments()
    @argument("runs", nargs="+", help="run ids, id prefixes or names: overlaid for comparison")
    @_usage
    def llm_dashboard(self, line: str = "") -> Any:
        """The live dashboard of one run, or of several overlaid."""
        from .widgets import Dashboard

        return Dashboard([self._run(r) for r in _parse(self.llm_dashboard, line).runs])


def load_ipython_extension(ipython: Any) -> None:
    from .rich import register

    ipython.register_magics(LLMMagics)
    register(ipython)
    if type(ipython).__name__ == "ZMQInteractiveShell":
        # in a kernel, runs display as widget dashboards: load the widget stack (ipywidgets,
        # bqplot and the pandas it imports, ~1 s) now, not inside the first %llm_train cell
        import jupyter_llm.widgets.dashboard  # noqa: F401


__all__ = ["LLMMagics", "load_ipython_extension"]
