"""Time from pressing Generate to the first token on screen, with the generator already warm.

Trains the demo-sized model (4 layers, 128 dims, Shakespeare-char, 200 steps, 1 rank), opens a
notebook with `%llm_chat` in real JupyterLab (headless Chromium, the test harness), presses
Generate once to start the generator, then `--reps` times: Clear, press Generate, and wait (in
the page, every animation frame) until the output holds more than the prompt. Beside it, in the
same invocation, the baseline: the same request straight to the generator's socket from Python
(no widget, no kernel, no browser). Goal: median on screen <= 0.3 s.

    python bench/playground_latency.py [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the browser harness
from browser import JupyterLab  # noqa: E402

from jupyter_llm import launch  # noqa: E402
from jupyter_llm.playground import Generator  # noqa: E402

CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
PROMPT = "ROMEO:"
OUT = ".jupyter-llm-playground-output textarea"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="pg-bench-"))
    os.environ["JUPYTER_LLM_HOME"] = str(home)
    spec = {"name": "pg", "model": {"config": {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128}},
            "tokenizer": {"train": {"kind": "char"}}, "data": {"train": [str(CORPUS)], "block_size": 64},
            "train": {"micro_batch_size": 12, "max_steps": 200, "log_every": 50, "eval_every": 0, "save_every": 0},
            "distributed": {"procs_per_node": 1, "zero_stage": 0}}  # fmt: skip
    run = launch(spec, root=home / "runs", wait=True, timeout=900)
    assert run.state == "completed", run.summary()
    settings = {"max_new_tokens": a.max_new_tokens, "temperature": 0.8, "top_k": 40, "seed": 1}

    # the baseline: the generator's socket from Python
    gen = Generator(run).start()
    gen.generate(PROMPT, **settings)
    direct = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        for _piece in gen.stream(PROMPT, **settings):
            direct.append(time.perf_counter() - t0)
            break
        time.sleep(0.05)
        gen.stop()
    gen.close()

    cells = ["%load_ext jupyter_llm", f"pg = %llm_chat {run.id}\npg.temperature.value = 0.8\n"
             f"pg.top_k.value = 40\npg.seed.value = 1\npg.max_new_tokens.value = {a.max_new_tokens}\npg"]  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="pg-lab-"))
    nb_file = tmp / "pg.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, nb_file)
    screen = []
    with JupyterLab(tmp, {"JUPYTER_LLM_HOME": str(home)}) as lab, lab.open_notebook(nb_file) as nb:
        nb.run_cell(0, timeout=120)
        nb.run_cell(1, timeout=120)
        pg = nb.wait_for(".jupyter-llm-playground", timeout=60)
        pg.locator(".jupyter-llm-playground-prompt textarea").first.fill(PROMPT)
        button, stats = (
            pg.locator(".jupyter-llm-playground-generate"),
            pg.locator(".jupyter-llm-playground-stats"),
        )
        button.click()  # warm: the generator starts and loads the model
        nb.wait_until(lambda: "pieces in" in stats.inner_text(), timeout=300, what="the warm-up generation")
        for _ in range(a.reps):
            pg.locator("button:has-text('Clear')").click()
            nb.page.wait_for_function(f"() => document.querySelector('{OUT}').value === ''", polling="raf")
            t0 = time.perf_counter()
            button.click()
            nb.page.wait_for_function(
                f"() => document.querySelector('{OUT}').value.length > {len(PROMPT)}",
                polling="raf",
                timeout=30000,
            )
            screen.append(time.perf_counter() - t0)
            nb.wait_until(lambda: "pieces in" in stats.inner_text() and not button.is_disabled(), timeout=60,
                          what="the generation's end")  # fmt: skip
    med_screen, med_direct = statistics.median(screen), statistics.median(direct)
    print(json.dumps({
        "what": "Generate pressed -> first token on screen (warm generator), vs the socket from Python",
        "reps": a.reps, "max_new_tokens": a.max_new_tokens,
        "on_screen_s": {"median": round(med_screen, 4), "p95": round(sorted(screen)[int(0.95 * (len(screen) - 1))], 4),
                        "all": [round(x, 4) for x in screen]},
        "socket_s": {"median": round(med_direct, 4), "all": [round(x, 4) for x in direct]},
        "goal_s": 0.3, "met": med_screen <= 0.3,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
