"""The screens people watch, measured in real JupyterLab (headless Chromium) over the shared real
run and a second one: the dashboard, the comparison, the spec form, the runs table and the
sidebar's run panel, in the light and the dark theme at 1400x900 and in a 900-px-wide window
with the sidebar open. In every one: no element wider than its box, no axis label over its tick
numbers, axis labels and a legend on every chart, text at 4.5:1 and chart lines at 3:1 against
what is behind them (tests/screens.js measures it in the page). Screenshots of each screen go
to the test artifacts (linked from docs/tour.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import yaml
from browser import BROWSER_MARKS, JupyterLab

from jupyter_llm.files import read_json, write_json_atomic
from jupyter_llm.runs import Run

pytestmark = [*BROWSER_MARKS]
MEASURE = (Path(__file__).parent / "screens.js").read_text()


def two_runs(evaluated_run: Run, root: Path) -> tuple[Path, Path]:
    """The shared run copied under `root`, and a second copy with another name and seed (a
    second real run's folder; the shared root stays as it is for the other tests)."""
    first = root / evaluated_run.id
    shutil.copytree(evaluated_run.path, first)
    second = root / (evaluated_run.id.rsplit("-", 2)[0] + "-other-beef")
    shutil.copytree(evaluated_run.path, second)
    spec = yaml.safe_load((second / "spec.yaml").read_text())
    (second / "spec.yaml").write_text(yaml.safe_dump({**spec, "name": "other", "seed": 7}))
    st = read_json(second / "status.json") or {}
    write_json_atomic(second / "status.json", {**st, "name": "other", "run_id": second.name})
    # every metric an evaluation can have, whichever evaluation the shared run had last: the
    # comparison's widest case (it once overflowed a 460-px notebook with two of them)
    write_json_atomic(second / "eval.json", {"checkpoint": "final", "perplexity": {"ppl": 27.03, "loss": 3.297},
                                             "bleu": 1.234, "rouge1": 0.1234, "rouge2": 0.0123, "rougeL": 0.1111})  # fmt: skip
    return first, second


def measured(page: object, selector: str, tries: int = 6) -> list[str]:
    """The problems of a view as a person sees it: scrolled into view (JupyterLab lays out only
    what is on screen), once its charts have redrawn to their size (bqplot relayouts a moment
    after a resize): measured again while problems remain, at most `tries` times."""
    view = page.locator(selector).first  # type: ignore[attr-defined]
    figures = view.locator(".bqplot.figure")
    for i in range(figures.count()):  # each chart on screen once, as scrolling past it shows it
        if figures.nth(i).is_visible():
            figures.nth(i).scroll_into_view_if_needed()
            page.wait_for_timeout(300)  # type: ignore[attr-defined]
    view.scroll_into_view_if_needed()
    for _ in range(tries):
        problems: list[str] = page.evaluate(MEASURE, selector)  # type: ignore[attr-defined]
        if not problems:
            break
        page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    return problems


def test_screens_hold_in_both_themes_and_at_narrow_width(evaluated_run: Run, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, second = two_runs(evaluated_run, home / "runs")
    cells = [
        "%load_ext jupyter_llm",
        f"from jupyter_llm.widgets import Dashboard, RunsTable, SpecForm\nDashboard('{first.name}')",
        f"%llm_compare {first.name} {second.name}",
        f"SpecForm('{first.name}', estimate_memory=False)",
        "RunsTable()",
    ]
    nb_file = tmp_path / "screens.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, nb_file)
    with JupyterLab(tmp_path, {"JUPYTER_LLM_HOME": str(home)}) as lab, lab.open_notebook(nb_file) as nb:
        page = nb.page
        page.set_viewport_size({"width": 1400, "height": 900})
        for i in range(len(cells)):
            nb.run_cell(i, timeout=120)
        nb.wait_for(".jupyter-llm-dashboard .bqplot.figure .line", timeout=60)
        nb.wait_for(".jupyter-llm-compare-view .bqplot.figure", timeout=60)
        nb.wait_for(".jupyter-llm-specform", timeout=60)
        page.evaluate("window.jupyterapp.commands.execute('jupyter-llm:open-sidebar')")
        nb.wait_for(f'.jp-llm-run[data-run-id="{first.name}"]', timeout=60)
        notebook_id = page.evaluate("document.querySelector('.jp-NotebookPanel').id")
        found: dict[str, list[str]] = {}
        for theme, width in [
            ("JupyterLab Light", 1400),
            ("JupyterLab Dark", 1400),
            ("JupyterLab Light", 900),
        ]:
            page.evaluate(f"window.jupyterapp.shell.activateById('{notebook_id}')")
            page.evaluate(
                f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{theme}'}})"
            )
            nb.wait_until(lambda t=theme: page.evaluate("document.body.dataset.jpThemeName") == t, timeout=60,
                          what=f"the {theme} theme")  # fmt: skip
            page.set_viewport_size({"width": width, "height": 900})  # resized while the notebook shows
            page.wait_for_timeout(1500)  # the charts redraw to their new size
            tag = f"{theme.split()[-1].lower()}-{width}"
            for sel, shot in [(".jupyter-llm-dashboard", "dashboard"), (".jupyter-llm-compare-view", "compare"),
                              (".jupyter-llm-specform", "form"), (".jupyter-llm-runs-table", "runs-table")]:  # fmt: skip
                found[f"{tag} {shot}"] = measured(page, sel)
                page.evaluate("s => document.querySelector(s).scrollIntoView({block: 'start'})", sel)
                nb.screenshot(f"screens-{shot}-{tag}")  # its top, as one scrolls to it
            # the sidebar's run panel of the first run
            page.locator(f'.jp-llm-run[data-run-id="{first.name}"]').first.click()
            nb.wait_for(f'.jp-llm-panel[data-run-id="{first.name}"] svg', timeout=60)
            page.wait_for_timeout(500)
            nb.screenshot(f"screens-run-panel-{tag}")
            # the samples taken while training, newest first, and the overview with the system sample
            panel = f'.jp-llm-panel[data-run-id="{first.name}"]'
            assert [t.strip() for t in page.locator(f"{panel} .jp-llm-samples td:first-child").all_inner_texts()] == [
                "30", "15", "1"]  # fmt: skip
            assert page.locator(f"{panel} .jp-llm-overview th", has_text="system (").count() == 1
            found[f"{tag} run panel"] = measured(page, ".jp-llm-panel")
        # two runs ticked in the sidebar and compared: curves in two colours, a table, the spec diff
        for name in (first.name, second.name):
            page.locator(f'.jp-llm-run[data-run-id="{name}"] input.jp-llm-pick').first.check()
        page.locator(".jp-llm-sidebar button.jp-llm-compare", has_text="Compare 2 runs").click()
        nb.wait_for(".jp-llm-compare-panel polyline.jp-llm-curve", timeout=60)
        strokes = page.evaluate("[...document.querySelectorAll('.jp-llm-compare-panel polyline.jp-llm-curve')]"
                                ".map(p => p.getAttribute('stroke'))")  # fmt: skip
        assert len(strokes) == 2 and len(set(strokes)) == 2, strokes
        table = page.locator(
            ".jp-llm-compare-panel .jp-llm-compare-table"
        )  # a row per number, a column per run
        assert table.locator("tr").first.locator("th").count() == 3
        assert table.locator("tr", has_text="perplexity").locator("td").all_inner_texts()[1] == "27.03"
        assert page.locator(".jp-llm-compare-panel .jp-llm-spec-diff td", has_text="seed").count() == 1
        nb.screenshot("screens-sidebar-compare")
        found["light-900 sidebar compare"] = measured(page, ".jp-llm-compare-panel")
        # the comparison's bars in the runs' own colours, one per run, as in the overlaid curves
        fills = page.evaluate("[...document.querySelector('.jupyter-llm-compare-view .bqplot.figure')"
                              ".querySelectorAll('rect.bar')].map(r => getComputedStyle(r).fill)")  # fmt: skip
        assert len(fills) == 2 and len(set(fills)) == 2, fills
        assert not any(found.values()), "\n".join(f"{k}: {p}" for k, ps in found.items() for p in ps)
