"""JupyterLab in headless Chromium: ipywidgets and a live bqplot line render from a notebook."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from browser import BROWSER_MARKS, JupyterLab, Notebook

pytestmark = [*BROWSER_MARKS]

POINTS = 30
LINE = ".bqplot.figure path.line"  # the SVG path of a bqplot Lines mark

CELLS = [
    f"import math, time\nimport ipywidgets as w, bqplot as bq\nPOINTS = {POINTS}",
    """\
slider = w.IntSlider(value=3, min=0, max=10, description="steps")
xs, ys = bq.LinearScale(min=0, max=POINTS - 1), bq.LinearScale(min=-1, max=1)
line = bq.Lines(x=[0.0], y=[0.0], scales={"x": xs, "y": ys})
axes = [bq.Axis(scale=xs), bq.Axis(scale=ys, orientation="vertical")]
display(w.VBox([slider, bq.Figure(marks=[line], axes=axes, title="smoke")]))""",
    """\
for n in range(2, POINTS + 1):  # the line grows while the cell runs
    time.sleep(0.25)
    with line.hold_sync():
        line.x = list(range(n))
        line.y = [math.sin(i / 3) for i in range(n)]""",
]


def line_points(nb: Notebook) -> int:
    """Vertices of the bqplot line's SVG path ("M0,1L2,3L...")."""
    d = nb.page.locator(LINE).first.get_attribute("d", timeout=5000) or ""
    return len(re.findall(r"[ML]", d))


def test_widgets_and_live_bqplot(tmp_path: Path) -> None:
    nb_file = tmp_path / "smoke.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, nb_file)

    env = {"JUPYTER_LLM_HOME": os.environ["JUPYTER_LLM_HOME"]}
    with JupyterLab(tmp_path, env) as lab, lab.open_notebook(nb_file) as nb:
        nb.run_all(wait=False)
        nb.wait_for(".jupyter-widgets .widget-slider")
        nb.wait_for(LINE)
        seen: list[int] = []

        def complete() -> bool:
            n = line_points(nb)
            if not seen or n != seen[-1]:
                seen.append(n)
            return n >= POINTS

        nb.wait_until(complete, timeout=60, what=f"a bqplot line of {POINTS} points", interval=0.1)
        nb.wait_done(timeout=60)
        nb.screenshot("browser-smoke")
    print(f"bqplot line points seen: {seen}")
    assert seen == sorted(seen), f"the line lost points: {seen}"
    assert len(seen) >= 4, f"the line did not grow step by step: {seen}"
    assert seen[-1] == POINTS, seen
