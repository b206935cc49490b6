"""Notebook displays for the package's objects, registered with IPython by type name.

The layers below never import displays or widgets: a `Run` shows as the live dashboard (its
HTML where a front end renders no widgets, e.g. a saved notebook), a `DryRun` as its plan,
a `Sweep` as its trials and a `Comparison` as its table, bars and overlaid curves.
`import jupyter_llm` inside IPython registers them, and so does `%load_ext jupyter_llm`;
registering by name imports none of the types.
"""

from __future__ import annotations

import sys
from typing import Any


def register(ip: Any) -> None:
    """Register the displays with IPython shell `ip` (idempotent)."""
    fmt = ip.display_formatter
    html = fmt.formatters["text/html"]
    html.for_type_by_name("jupyter_llm.folder", "RunFolder", _run_html)
    html.for_type_by_name("jupyter_llm.preflight", "DryRun", _dry_run_html)
    html.for_type_by_name("jupyter_llm.evaluation", "Comparison", _comparison_html)
    live = fmt.ipython_display_formatter
    live.for_type_by_name("jupyter_llm.runs", "Run", _show_dashboard)
    live.for_type_by_name("jupyter_llm.sweep", "Sweep", _show_sweep)
    live.for_type_by_name("jupyter_llm.evaluation", "Comparison", _show_comparison)


def register_with_running_ipython() -> None:
    """Register with the IPython shell of this process, if there is one."""
    ipython = sys.modules.get("IPython")
    ip = ipython.get_ipython() if ipython is not None else None
    if ip is not None and hasattr(ip, "display_formatter"):
        register(ip)


def _run_html(run: Any) -> str:
    from .display import run_html

    return run_html(run)


def _dry_run_html(d: Any) -> str:
    from .display import dry_run_html

    return dry_run_html(d)


def _comparison_html(c: Any) -> str:
    from .display import comparison_html

    return comparison_html(c)


def _show_comparison(c: Any) -> None:
    from IPython.display import display

    from .widgets.compare import CompareView

    display(CompareView(c))


def _show_dashboard(run: Any) -> None:
    from IPython.display import display

    from .widgets import Dashboard

    display(Dashboard(run))


def _show_sweep(sweep: Any) -> None:
    from IPython.display import display

    from .widgets.sweep_view import SweepView

    display(SweepView(sweep))
