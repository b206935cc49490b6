"""The "LLM runs" sidebar in real JupyterLab (headless Chromium): a run started from the CLI
appears, its progress and sparkline advance, its panel shows the curve, and Stop stops it.

The run is too long to end inside the test (a million steps): only the test's Stop ends it,
so nothing here races the machine's speed. Progress is read from the step the row shows (the
sparkline keeps its last 60 points, so its point count stops changing once it is full)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from browser import BROWSER_MARKS, JupyterLab

from conftest import tiny_spec
from jupyter_llm.runs import RunStore

pytestmark = [*BROWSER_MARKS, pytest.mark.deepspeed]


def spark_points(page: object, selector: str) -> int:
    loc = page.locator(selector)  # type: ignore[attr-defined]
    if loc.count() == 0:
        return 0
    return len(re.findall(r"[\d.]+,[\d.]+", loc.first.get_attribute("points") or ""))


def test_sidebar_follows_and_stops_a_cli_run(tmp_path: Path, corpus: Path) -> None:
    root = tmp_path / "runs"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(corpus, name="sidebar",
                                             train={"max_steps": 1_000_000, "log_every": 5, "eval_every": 0, "save_every": 0})))  # fmt: skip
    nb_file = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), nb_file)
    # the ranks hold 6 s after building the model: the sidebar shows the "first step" phase for sure
    env = {**os.environ, "JUPYTER_LLM_RUNS": str(root), "JUPYTER_LLM_FAULT": "startup_delay_ms:6000"}
    with JupyterLab(tmp_path, {"JUPYTER_LLM_RUNS": str(root)}) as lab, lab.open_notebook(nb_file) as nb:
        page = nb.page
        page.evaluate("window.jupyterapp.commands.execute('jupyter-llm:open-sidebar')")
        nb.wait_for(".jp-llm-sidebar", timeout=60)
        out = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "train", str(spec)], env=env, check=True,
                             capture_output=True, text=True)  # fmt: skip
        run = RunStore(root).get(out.stdout.strip())
        row = f'.jp-llm-run[data-run-id="{run.id}"]'
        nb.wait_for(row, timeout=60)
        # before its first metric the row says what the run is doing, not "running · step 0"
        nb.wait_until(lambda: "first step" in page.locator(f"{row} .jp-llm-meta").first.inner_text(),
                      timeout=300, what="the row to show the first-step phase", interval=0.3)  # fmt: skip
        nb.screenshot("sidebar-start-up")
        steps: set[int] = set()

        def advancing() -> bool:
            shown = re.search(r"step (\d+)/", page.locator(f"{row} .jp-llm-meta").first.inner_text())
            if shown and int(shown.group(1)) > 0:
                steps.add(int(shown.group(1)))
            return len(steps) >= 3 and spark_points(page, f"{row} svg.jp-llm-spark polyline") > 1

        nb.wait_until(
            advancing, timeout=300, what="the sidebar's step and sparkline to advance", interval=0.5
        )
        assert run.state == "running"  # it cannot have ended: only the Stop below ends it
        width = page.locator(f"{row} .jp-llm-progress > div").first.evaluate("e => parseFloat(e.style.width)")
        assert width > 0
        page.locator(row).first.click()
        panel = f'.jp-llm-panel[data-run-id="{run.id}"]'
        nb.wait_for(panel, timeout=60)
        nb.wait_until(lambda: spark_points(page, f"{panel} polyline.jp-llm-curve") > 2, timeout=60,
                      what="the panel's loss curve")  # fmt: skip
        # titled charts with axis labels and a legend; the tab is titled by the run's name
        for title in ("loss", "learning rate", "gradient norm", "throughput", "memory"):
            chart = page.locator(
                f"{panel} svg.jp-llm-chart", has=page.locator(f"text.jp-llm-chart-title >> text='{title}'")
            )
            assert chart.count() == 1, title
            assert (
                chart.locator("text.jp-llm-axis-label").count() == 2
                and chart.locator("text.jp-llm-legend").count() >= 1
            )
        assert (
            page.locator(
                ".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel"
            ).first.inner_text()
            == "sidebar"
        )
        assert page.locator(f"{panel} .jp-llm-overview", has_text="layout").count() == 1
        # the log: the worker's own step lines, and a search that keeps only the matching lines
        search = page.locator(f"{panel} input.jp-llm-log-search")
        search.fill("[JUPYTER-LLM] step")
        nb.wait_until(lambda: "lines hold" in page.locator(f"{panel} .jp-llm-logbox .jp-llm-meta").inner_text(),
                      timeout=30, what="the log search")  # fmt: skip
        shown = page.locator(f"{panel} pre.jp-llm-logs").inner_text().splitlines()
        assert shown and all("[jupyter-llm] step" in line for line in shown), shown[:5]
        search.fill("")
        nb.screenshot("sidebar-run-panel")
        # the panel comes back after a reload (the layout restorer), still following the run
        nb.wait_until(lambda: f"jupyter-llm-run:{run.id}" in str(lab.api("GET", "/lab/api/workspaces/default")),
                      timeout=60, what="JupyterLab to save the layout with the panel")  # fmt: skip
        page.goto(f"{lab.base_url}/lab?token={lab.token}")
        nb.wait_until(lambda: page.locator(f"{panel} polyline.jp-llm-curve").count() > 0, timeout=120,
                      what="the run panel restored after a reload")  # fmt: skip
        page.locator(f"{panel} .jp-llm-stop").first.click()
        assert run.wait(300) == "stopped"
        nb.wait_until(lambda: page.locator(f'{row}[data-state="stopped"]').count() > 0, timeout=60,
                      what="the sidebar to show the run stopped")  # fmt: skip
        nb.screenshot("sidebar-stopped")
