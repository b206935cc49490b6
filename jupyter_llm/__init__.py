"""jupyter-llm: train and fine-tune language models from Jupyter with detached DeepSpeed jobs.

`import jupyter_llm` is light: torch, deepspeed and transformers are imported only by the
worker processes. Public API: `Spec`, `launch`, `prepare`, `Run`, `RunStore`, `runs`, `get_run`, `evaluate`,
`compare`, `sweep`, `get_sweep`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .evaluation import compare, evaluate
    from .runs import Run, RunStore, launch, prepare
    from .spec import Spec
    from .sweep import get_sweep, sweep

_LAZY: dict[str, tuple[str, str | None]] = {
    "runs": ("runs", None),  # callable module: jupyter_llm.runs() lists every run
    "Spec": ("spec", "Spec"),
    "launch": ("runs", "launch"),
    "prepare": ("runs", "prepare"),
    "Run": ("runs", "Run"),
    "RunStore": ("runs", "RunStore"),
    "evaluate": ("evaluation", "evaluate"),
    "compare": ("evaluation", "compare"),
    "sweep": ("sweep", None),  # callable module: jupyter_llm.sweep(spec) starts a sweep
    "get_sweep": ("sweep", "get_sweep"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'jupyter_llm' has no attribute {name!r}")


def get_run(run_id: str | None = None, root: str | None = None) -> Run:
    """A run by id, id prefix or name; the newest when `run_id` is None."""
    from .runs import RunStore

    return RunStore(root).get(run_id)


__all__ = ["Run", "RunStore", "Spec", "__version__", "compare", "evaluate", "get_run", "get_sweep", "launch",
           "load_ipython_extension", "prepare", "runs", "sweep"]  # fmt: skip


def _register_displays() -> None:
    import sys

    if "IPython" in sys.modules:  # a notebook or IPython shell: show runs, sweeps, dry runs richly
        from .rich import register_with_running_ipython

        register_with_running_ipython()


_register_displays()


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """jupyter_server finds the REST API extension (jupyter_llm.server) through this."""
    return [{"module": "jupyter_llm.server"}]


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext jupyter_llm`: registers the magics; imports no torch."""
    from .magics import load_ipython_extension as _load

    _load(ipython)
