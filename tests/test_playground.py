"""The playground's generator processes, on the shared real run: greedy text equal to
transformers' own generate, streaming in pieces, Stop, seeds, two checkpoints side by side,
the processes gone after close, after their idle timeout and when their parent is killed, and
a parent that never imports torch. A tiny chat run answers through its chat template."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import wait_for
from jupyter_llm.errors import UserError
from jupyter_llm.playground import Generator, generator_pids
from jupyter_llm.runs import Run

pytestmark = pytest.mark.deepspeed

PROMPT = "ROMEO:"


def direct_greedy(model_dir: Path, prompt: str, n: int, tok_dir: Path | None = None) -> str:
    """Greedy continuation computed here with transformers' generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)  # fmt: skip
    return str(tok.decode(out[0][len(ids) :], skip_special_tokens=True))


def gone(pid: int, timeout: float = 20) -> None:
    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(dead, timeout, f"generator {pid} to exit")


def test_generation_streams_stops_and_matches_transformers(evaluated_run: Run) -> None:
    run = evaluated_run
    gen = Generator(run)
    try:
        msgs = list(gen.events(PROMPT, max_new_tokens=40, temperature=0))
        pieces = [m["text"] for m in msgs if "text" in m]
        done = msgs[-1]
        assert done["done"] and not done["stopped"] and done["first_token_s"] is not None
        assert len(pieces) >= 2, pieces  # streamed, not one block at the end
        assert "".join(pieces) == direct_greedy(run.path / "final", PROMPT, 40)
        # a seed makes sampling repeatable
        a = gen.generate(PROMPT, max_new_tokens=60, temperature=1.0, top_k=20, seed=3)
        assert a == gen.generate(PROMPT, max_new_tokens=60, temperature=1.0, top_k=20, seed=3)
        # Stop, from another thread, ends a long generation early
        out: list[dict[str, Any]] = []
        t = threading.Thread(
            target=lambda: out.extend(gen.events(PROMPT, max_new_tokens=4000, temperature=0))
        )
        t.start()
        wait_for(lambda: any("text" in m for m in out), 60, "the first piece")
        gen.stop()
        t.join(30)
        assert out[-1]["done"] and out[-1]["stopped"], out[-1]
        assert len("".join(m.get("text", "") for m in out)) < 4000
        # more new tokens than the model has positions: capped there, said so, no crash
        positions = json.loads((run.path / "final" / "config.json").read_text())["n_positions"]
        last = list(gen.events(PROMPT, max_new_tokens=positions + 100, temperature=0))[-1]
        assert last["done"] and not last.get("error") and last["capped_at"] == positions - len(PROMPT)
        with pytest.raises(UserError, match="unknown generation setting"):
            gen.generate(PROMPT, temprature=1)
        pid = gen.pid
        assert pid is not None and pid in generator_pids()
    finally:
        gen.close()
    gone(pid)


def test_two_checkpoints_side_by_side_and_bad_requests(evaluated_run: Run, ip: Any, monkeypatch: Any) -> None:
    from jupyter_llm.widgets import Playground

    run = evaluated_run
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(run.path.parent.parent))
    pg = ip.run_line_magic("llm_chat", f"{run.id} --compare 15")
    assert isinstance(pg, Playground) and [p.gen.checkpoint for p in pg.panes] == ["final", 15]
    pg.temperature.value, pg.max_new_tokens.value = 0.0, 30
    pg.prompt.value = PROMPT
    pg.generate(wait=True)
    final, step15 = pg.text()
    assert final == PROMPT + direct_greedy(run.path / "final", PROMPT, 30)
    assert step15.startswith(PROMPT) and step15 != final  # another model answered the same prompt
    assert all("pieces in" in p.stats.value for p in pg.panes)
    pids = pg.pids
    assert len(pids) == 2
    pg.close()
    for pid in pids:
        gone(pid)
    with pytest.raises(UserError, match=r"no complete checkpoint 7; it has final and \[15\]"):
        Generator(run, 7)


def test_generators_end_when_idle_or_when_their_parent_is_killed(evaluated_run: Run) -> None:
    run = evaluated_run
    gen = Generator(run, idle_timeout=2).start()
    assert gen.pid is not None
    gone(gen.pid, 30)  # nobody asked for anything
    # a "kernel" that starts a generator, generates, and is killed: the generator follows it
    code = (
        "import json, sys\nfrom jupyter_llm.playground import Generator\nfrom jupyter_llm.folder import RunFolder\n"
        f"g = Generator(RunFolder({str(run.path)!r}))\ntext = g.generate('ROMEO:', max_new_tokens=5, temperature=0)\n"
        "print(json.dumps({'pid': g.pid, 'torch': 'torch' in sys.modules, 'text': text}), flush=True)\n"
        "import time\ntime.sleep(600)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})  # fmt: skip
    try:
        line = json.loads(kernel.stdout.readline() if kernel.stdout else "{}")
        assert line["text"] and line["torch"] is False  # the parent generated without importing torch
        assert psutil.pid_exists(line["pid"])
        kernel.send_signal(signal.SIGKILL)
        kernel.wait(10)
        gone(line["pid"], 30)
    finally:
        kernel.kill()


def test_a_chat_run_answers_through_its_chat_template(tmp_path: Path, corpus: Path) -> None:
    from conftest import tiny_spec
    from jupyter_llm import launch

    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    convs = [{"messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": f"{i + 1}."}]}
             for i in range(200)]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    spec = tiny_spec(corpus, name="chatty", tokenizer={"train": {"kind": "char"}, "chat_template": template},
                     data={"train": [str(data)], "format": "chat", "validation": [str(data)], "block_size": 32},
                     train={"max_steps": 10, "log_every": 5, "eval_every": 0, "save_every": 0},
                     distributed={"procs_per_node": 1, "zero_stage": 0})  # fmt: skip
    run = launch(spec, root=tmp_path / "runs", wait=True, timeout=600)
    assert run.state == "completed", "\n".join(run.log_tail(30, rank=0))
    from jupyter_llm.widgets import Playground

    pg = Playground(run)
    try:
        assert pg.panes[0].gen.chat and pg.generate_button.description == "Send"
        pg.temperature.value, pg.max_new_tokens.value = 0.0, 8
        pg.prompt.value = "Add 3 and 1."
        pg.generate(wait=True)
        pane = pg.panes[0]
        assert [m["role"] for m in pane.messages] == ["user", "assistant"]
        assert pg.prompt.value == ""  # the message moved into the transcript
        # the reply is what transformers' greedy generate gives on the chat template's rendering
        rendered = "<user>Add 3 and 1.\n<assistant>"
        assert pane.messages[1]["content"] == direct_greedy(run.path / "final", rendered, 8)
        assert pane.output.value == f"user: Add 3 and 1.\nassistant: {pane.messages[1]['content']}"
    finally:
        pg.close()


def test_rest_generation_streams_and_its_generator_ends_with_the_server(
    evaluated_run: Run, tmp_path: Path
) -> None:
    import requests
    from browser import JupyterLab

    run = evaluated_run
    with JupyterLab(tmp_path, {"JUPYTER_LLM_RUNS": str(run.path.parent)}) as lab:
        url = f"{lab.base_url}/jupyter-llm/api/runs/{run.id}/generate"
        auth = {"Authorization": f"token {lab.token}"}
        assert requests.post(url, json={"prompt": PROMPT}, timeout=30).status_code == 403
        with requests.post(url, json={"prompt": PROMPT, "max_new_tokens": 40, "temperature": 0}, headers=auth,
                           stream=True, timeout=300) as r:  # fmt: skip
            assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-ndjson"
            lines = [json.loads(x) for x in r.iter_lines() if x]
        pieces = [m["text"] for m in lines if "text" in m]
        assert len(pieces) >= 2 and lines[-1]["done"] and not lines[-1].get("error")
        assert "".join(pieces) == direct_greedy(run.path / "final", PROMPT, 40)
        bad = [({"prompt": 3}, "prompt must be a string"), ({}, 'give "prompt"'),
               ({"prompt": "x", "temprature": 1}, "unknown field(s) ['temprature']"),
               ({"prompt": "x", "seed": "one"}, "seed must be a number"),
               ({"prompt": "x", "checkpoint": 7}, "no complete checkpoint 7")]  # fmt: skip
        for body, message in bad:
            r = requests.post(url, json=body, headers=auth, timeout=30)
            assert r.status_code == 400 and message in r.json()["message"], (body, r.text)
        assert requests.post(url, json={"stop": True}, headers=auth, timeout=30).json() == {"stopped": True}
        pids = [p for p in generator_pids() if str(run.path) in " ".join(psutil.Process(p).cmdline())]
        assert len(pids) == 1
    gone(pids[0], 30)  # the server is gone: so is its generator
