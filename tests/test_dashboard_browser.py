"""The dashboard and the spec form in real JupyterLab (headless Chromium): `%%llm_train` runs a
tiny real DeepSpeed job whose curve gains points until it completes; then a SpecForm cloned from
it gets a new learning rate typed in, Launch starts a second run, and its Stop button stops it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from browser import BROWSER_MARKS, JupyterLab, Notebook

from conftest import tiny_spec
from jupyter_llm.runs import RunStore

pytestmark = [*BROWSER_MARKS, pytest.mark.deepspeed]

FIRST = ".jupyter-llm-dashboard >> nth=0"
LOSS_LINE = ".bqplot.figure >> nth=0 >> path.line >> nth=0"  # the train-loss curve of the first run
NEW_LR = "0.0005"


def points(nb: Notebook, dashboard: str) -> int:
    loc = nb.page.locator(f"{dashboard} >> {LOSS_LINE}")
    if loc.count() == 0:
        return 0
    return len(re.findall(r"[ML]", loc.get_attribute("d", timeout=5000) or ""))


def state(nb: Notebook, dashboard: str) -> str:
    loc = nb.page.locator(f"{dashboard} >> .jupyter-llm-state >> nth=0")  # the badge shows start-up phases
    return (loc.get_attribute("data-state", timeout=5000) or "") if loc.count() else ""


def test_dashboard_and_form_in_jupyterlab(tmp_path: Path, corpus: Path) -> None:
    home = Path(os.environ["JUPYTER_LLM_HOME"])
    spec = tiny_spec(corpus, name="browser-run",
                     train={"max_steps": 60, "log_every": 5, "eval_every": 20, "save_every": 0})  # fmt: skip
    cells = [
        "%load_ext jupyter_llm",
        "%%llm_train browser-run\n" + yaml.safe_dump({k: v for k, v in spec.items() if k != "name"}),
        "from jupyter_llm.widgets import SpecForm\nform = SpecForm('browser-run', estimate_memory=False)\nform",
    ]
    nb_file = tmp_path / "dashboard.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, nb_file)
    store = RunStore(home / "runs")

    # the ranks hold 6 s after building the model (the "first step" phase is on screen for sure)
    # and take >= 0.1 s a step (the curve grows over >= 6 s of polls, however fast the machine)
    env = {"JUPYTER_LLM_HOME": str(home), "JUPYTER_LLM_FAULT": "startup_delay_ms:6000,step_delay_ms:100"}
    with JupyterLab(tmp_path, env) as lab, lab.open_notebook(nb_file) as nb:
        nb.run_cell(0, timeout=120)
        nb.run_cell(1, timeout=120)
        nb.wait_for(FIRST, timeout=60)
        # before the first metric: the start-up phase as the badge and a line, not empty charts
        badge = nb.page.locator(f"{FIRST} >> .jupyter-llm-state >> nth=0")
        nb.wait_until(lambda: badge.inner_text(timeout=5000).strip() == "first step", timeout=300,
                      what="the badge to show the first-step phase", interval=0.3)  # fmt: skip
        assert (
            nb.page.locator(f"{FIRST} >> .jupyter-llm-startup", has_text="validating at step 0").count() == 1
        )
        assert points(nb, FIRST) == 0
        nb.screenshot("dashboard-start-up")
        # the curve gains points while the job trains, and the badge reaches "completed"
        seen: list[int] = []

        def grown_and_done() -> bool:
            n = points(nb, FIRST)
            if not seen or n != seen[-1]:
                seen.append(n)
            return state(nb, FIRST) == "completed" and n >= 12

        nb.wait_until(
            grown_and_done, timeout=600, what="the first run's curve and its completion", interval=0.3
        )
        assert len([n for n in seen if n > 0]) >= 3, f"the curve did not grow while the run went on: {seen}"
        assert seen[-1] == 12  # steps 5..60 every 5
        first = store.get("browser-run")
        assert first.state == "completed"
        nb.page.locator(f"{FIRST} >> .bqplot.figure >> nth=0").scroll_into_view_if_needed()
        nb.screenshot("dashboard-first-run")

        # the form cloned from the run: type a new learning rate into the slider's readout, Launch
        nb.run_cell(2, timeout=120)
        form = nb.wait_for(".jupyter-llm-specform", timeout=60)
        lr = form.locator(".jupyter-llm-field-optim-lr input").first  # the exact value beside the slider
        lr.fill(NEW_LR)
        lr.press("Enter")
        form.locator(".jupyter-widget-Collapse-header", has_text=re.compile(r"^\s*train\s*$")).click()
        steps = form.locator(".jupyter-llm-field-train-max_steps input").first
        steps.fill("-5")  # out of range: kept as typed, a problem beside it, Launch disabled
        steps.press("Enter")
        nb.wait_until(
            lambda: form.locator("text=greater than or equal to 1").count() > 0, what="the -5 problem"
        )
        assert steps.input_value() == "-5"
        assert form.locator("button:has-text('Launch')").is_disabled()
        nb.screenshot("form-out-of-range")
        steps.fill("5000")  # long enough to be stopped while it trains
        steps.press("Enter")
        nb.wait_until(lambda: form.locator("text=✔ valid spec").count() > 0, what="a valid spec")
        form.locator("button:has-text('Launch')").click()
        second_dash = ".jupyter-llm-specform >> .jupyter-llm-dashboard"
        nb.wait_for(second_dash, timeout=60)
        runs = nb.wait_until(lambda: [r for r in store.list() if r != first], timeout=60, what="a second run")
        second = runs[0]
        assert second.spec.optim.lr == pytest.approx(float(NEW_LR))
        assert second.spec.train.max_steps == 5000
        assert second.spec.model_dump(exclude={"optim", "train"}) == first.spec.model_dump(
            exclude={"optim", "train"}
        )
        nb.wait_until(lambda: state(nb, second_dash) == "running", timeout=300, what="the second run running")
        nb.screenshot("dashboard-form-launch")
        # Stop in the second run's dashboard stops it (ranks checkpoint, then exit)
        nb.page.locator(f"{second_dash} >> button:has-text('Stop')").first.click()
        nb.wait_until(lambda: state(nb, second_dash) == "stopped", timeout=300, what="the second run stopped")
        assert second.state == "stopped"
        nb.screenshot("dashboard-stopped")
