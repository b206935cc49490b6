"""The playground in real JupyterLab (headless Chromium) on the shared real run: tokens stream
into the page (the text grows over several screenshots), Stop ends the generation, two
checkpoints answer the same prompt side by side, the generators are gone after Close and after
the kernel is killed, and the kernel never imported torch."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import nbformat
import psutil
import pytest
from browser import BROWSER_MARKS, JupyterLab, Notebook

from conftest import wait_for
from jupyter_llm.playground import generator_pids
from jupyter_llm.runs import Run

pytestmark = [*BROWSER_MARKS, pytest.mark.deepspeed]

PG = ".jupyter-llm-playground >> nth=0"


def pane_text(nb: Notebook, i: int) -> str:
    return nb.page.locator(f"{PG} >> .jupyter-llm-playground-output >> nth={i} >> textarea").input_value(
        timeout=5000
    )


def ours(run: Run) -> list[int]:
    return [p for p in generator_pids() if str(run.path) in " ".join(psutil.Process(p).cmdline())]


def test_playground_streams_stops_compares_and_cleans_up(evaluated_run: Run, tmp_path: Path) -> None:
    run = evaluated_run
    cells = [
        "%load_ext jupyter_llm",
        f"pg = %llm_chat {run.id} --compare 15\npg",
        "import json, sys\nprint(json.dumps({'torch': 'torch' in sys.modules, 'pids': pg.pids}))",
        f"pg2 = %llm_chat {run.id}\npg2.generate('ROMEO:', wait=True)\npg2",
    ]
    nb_file = tmp_path / "playground.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, nb_file)
    with (
        # every generated token takes ≥ 20 ms (1018 tokens ≥ 20 s): the Stop below lands mid-way for
        # sure, instead of racing a model that may generate its whole context first (it did, in 1.3 s)
        JupyterLab(
            tmp_path,
            {"JUPYTER_LLM_HOME": str(run.path.parent.parent), "JUPYTER_LLM_FAULT": "token_delay_ms:20"},
        ) as lab,  # fmt: skip
        lab.open_notebook(nb_file) as nb,
    ):
        nb.run_cell(0, timeout=120)
        nb.run_cell(1, timeout=120)
        pg = nb.wait_for(PG, timeout=60)
        pg.locator(".jupyter-llm-playground-prompt textarea").first.fill("ROMEO:")

        def setting(label: str, value: str) -> None:
            box = pg.locator(".widget-inline-hbox", has_text=label).locator("input").first
            box.fill(value)
            box.press("Enter")

        setting("temperature", "0")
        setting("max new", "12")
        # two checkpoints, one prompt: both answer (the first Generate also starts both generators)
        pg.locator(".jupyter-llm-playground-generate").click()
        nb.wait_until(lambda: pg.locator(".jupyter-llm-playground-stats", has_text="pieces in").count() == 2,
                      timeout=300, what="both panes answered")  # fmt: skip
        short = [pane_text(nb, 0), pane_text(nb, 1)]
        assert all(t.startswith("ROMEO:") and len(t) > len("ROMEO:") for t in short), short
        assert short[0] != short[1]
        nb.screenshot("playground-side-by-side")
        setting("max new", "3000")
        pg.locator(".jupyter-llm-playground-generate").click()
        # the text grows while the models generate: several screenshots, each longer than the last
        lengths: list[int] = []
        for k in range(3):
            nb.wait_until(lambda: len(pane_text(nb, 0)) > (lengths[-1] if lengths else len("ROMEO:")) + 20,
                          timeout=120, what=f"more streamed text ({lengths})", interval=0.05)  # fmt: skip
            lengths.append(len(pane_text(nb, 0)))
            nb.screenshot(f"playground-streaming-{k}")
        assert lengths == sorted(lengths) and len(set(lengths)) == 3, lengths
        pg.locator(".jupyter-llm-playground-stop").click()
        nb.wait_until(lambda: pg.locator(".jupyter-llm-playground-stats", has_text="stopped").count() == 2,
                      timeout=60, what="both panes stopped")  # fmt: skip
        stopped = [pane_text(nb, 0), pane_text(nb, 1)]
        assert len(stopped[0]) < len("ROMEO:") + 3000  # ended early, and stays ended
        nb.page.wait_for_timeout(1000)
        assert [pane_text(nb, 0), pane_text(nb, 1)] == stopped
        nb.screenshot("playground-stopped")
        nb.run_cell(2, timeout=60)
        seen = nb.page.locator(".jp-OutputArea-output", has_text='"torch"').last.inner_text(timeout=10000)
        info = json.loads(seen.strip().splitlines()[-1])
        assert info["torch"] is False and len(info["pids"]) == 2 and set(info["pids"]) <= set(ours(run))
        # Close ends both generator processes
        pg.locator(".jupyter-llm-playground-close").click()
        for pid in info["pids"]:
            wait_for(lambda pid=pid: not psutil.pid_exists(pid), 30, f"generator {pid} gone after Close")
        # the sidebar's run panel: "Try it" streams the final model's answer from the server
        nb.page.evaluate("window.jupyterapp.commands.execute('jupyter-llm:open-sidebar')")
        nb.wait_for(f'.jp-llm-run[data-run-id="{run.id}"]', timeout=60).click()
        box = nb.wait_for(f'.jp-llm-panel[data-run-id="{run.id}"] .jp-llm-try', timeout=60)
        box.locator(".jp-llm-try-prompt").fill("ROMEO:")
        box.locator(".jp-llm-try-temperature").fill("0")
        box.locator(".jp-llm-try-max-new").fill("200")
        box.locator(".jp-llm-try-generate").click()
        output = box.locator(".jp-llm-try-output")
        nb.wait_until(
            lambda: len(output.inner_text()) > len("ROMEO:"), timeout=120, what="streamed text in the panel"
        )
        nb.wait_until(lambda: "pieces in" in box.locator(".jp-llm-try-stats").inner_text(), timeout=120,
                      what="the panel's generation done")  # fmt: skip
        assert output.inner_text().startswith("ROMEO:") and len(output.inner_text()) > len("ROMEO:") + 20
        nb.screenshot("playground-sidebar-try-it")
        # a new playground generates; killing the kernel takes its generator with it
        nb.run_cell(3, timeout=300)

        def kernels_generators() -> list[int]:  # (the sidebar's generator is the server's child)
            return [p for p in ours(run) if "ipykernel" in " ".join(psutil.Process(p).parent().cmdline())]

        [pid] = nb.wait_until(kernels_generators, timeout=30, what="the second playground's generator")
        kernel = psutil.Process(
            pid
        ).parent()  # the generator runs in a session of its own, as the kernel's child
        psutil.Process(kernel.pid).send_signal(signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 30, "the generator gone after the kernel was killed")  # fmt: skip
        nb.screenshot("playground-after-kernel-kill")
