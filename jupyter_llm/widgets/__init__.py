"""Notebook widgets (ipywidgets + bqplot): a spec form, a live dashboard, a runs table,
a playground for a trained model, runs compared.

    from jupyter_llm.widgets import SpecForm, Dashboard, RunsTable, Playground, CompareView

They read and write run folders only through the Python API; nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import CompareView
    from .dashboard import Dashboard
    from .form import SpecForm
    from .playground import Playground
    from .table import RunsTable

_LAZY = {
    "CompareView": "compare",
    "Dashboard": "dashboard",
    "SpecForm": "form",
    "RunsTable": "table",
    "Playground": "playground",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'jupyter_llm.widgets' has no attribute {name!r}")


__all__ = ["CompareView", "Dashboard", "Playground", "RunsTable", "SpecForm"]
