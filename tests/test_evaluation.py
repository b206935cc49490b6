"""Evaluation jobs on a real 2-rank run: numbers checked against direct computations."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import CORPUS, tiny_spec, wait_for
from jupyter_llm.cli import main as cli
from jupyter_llm.errors import RunStateError, SpecError, UserError
from jupyter_llm.evaluation import Comparison, Evaluation, compare, evaluate
from jupyter_llm.files import read_json, write_json_atomic
from jupyter_llm.runs import CKPT_MARKER, Run, RunStore
from jupyter_llm.spec import Spec


@pytest.fixture
def trained(evaluated_run: Run) -> Run:
    return evaluated_run


def auto_evaluation(run: Run) -> Evaluation:
    ev = wait_for(lambda: [e for e in run.events() if e["event"] == "eval_started"], 60, "eval_started")
    return Evaluation(run.path / "evals" / ev[0]["eval_id"])


def direct_perplexity(model_dir_or_model: Any, run: Run, max_blocks: int | None = None) -> float:
    """exp(mean token NLL) of the model on the run's validation tokens, computed here."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = (AutoModelForCausalLM.from_pretrained(model_dir_or_model)
             if isinstance(model_dir_or_model, str | Path) else model_dir_or_model).eval()  # fmt: skip
    data = Path(json.loads((run.path / "data.json").read_text())["path"])
    dtype = json.loads((data / "index.json").read_text())["dtype"]
    tokens = np.fromfile(data / "val.bin", dtype=dtype).astype(np.int64)
    b = run.spec.data.block_size
    n = len(tokens) // b if max_blocks is None else min(max_blocks, len(tokens) // b)
    ids = torch.from_numpy(tokens[: n * b].reshape(n, b))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def direct_text_perplexity(run: Run, text: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.path / "tokenizer")
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    b = run.spec.data.block_size
    n = len(ids) // b
    blocks = torch.tensor(ids[: n * b]).view(n, b)
    model = AutoModelForCausalLM.from_pretrained(run.final_model).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)
        )
    return math.exp(nll.item())


@pytest.mark.deepspeed
def test_spec_eval_section_runs_when_training_completes(trained: Run) -> None:
    ev = auto_evaluation(trained)
    assert ev.wait(300) == "completed", ev.summary() + "\n".join(ev.log_tail(30))
    res = ev.result
    assert res is not None and res["checkpoint"] == "final" and res["step"] == 30
    assert read_json(trained.path / "eval.json") == res  # the run's newest result
    # perplexity = exp(mean token NLL) of the final model on the validation split, computed here
    assert res["perplexity"]["source"] == "validation split"
    assert res["perplexity"]["ppl"] == pytest.approx(
        direct_perplexity(trained.final_model, trained), rel=1e-5
    )
    assert res["perplexity"]["ppl"] == pytest.approx(math.exp(res["perplexity"]["loss"]))
    [sample] = ev.samples()
    assert sample["prompt"] == "ROMEO:" and sample["output"] and sample["reference"] is None
    assert "perplexity" in ev._repr_html_() and "ROMEO:" in ev._repr_html_()


@pytest.mark.deepspeed
def test_checkpoint_bleu_rouge_equal_the_libraries(trained: Run, tmp_path: Path) -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    lines = [ln for ln in CORPUS.read_text().splitlines() if len(ln) > 40][:5]
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"q": ln[:20], "a": ln[20:40]}) + "\n" for ln in lines))
    ev = trained.evaluate(checkpoint=15, references=str(refs), prompt_field="q", reference_field="a",
                          max_new_tokens=20, wait=True, timeout=300)  # fmt: skip
    assert ev.state == "completed", ev.summary() + "\n".join(ev.log_tail(30))
    res = ev.result
    assert res is not None and res["checkpoint"] == "step-15" and res["step"] == 15
    samples = ev.samples()
    assert [s["prompt"] for s in samples] == [ln[:20] for ln in lines]
    hyps, gold = [s["output"] for s in samples], [s["reference"] for s in samples]
    assert res["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [gold]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for k in ("rouge1", "rouge2", "rougeL"):
        assert res[k] == pytest.approx(
            sum(scorer.score(g, h)[k].fmeasure for h, g in zip(hyps, gold, strict=True)) / len(hyps)
        )
    # the checkpoint's weights (consolidated from ZeRO-2's fp32 partitions) are not the final ones
    assert read_json(trained.path / "eval.json") == res  # now the run's newest result
    final = auto_evaluation(trained).result
    assert final is not None and final["checkpoint"] == "final"
    assert res["perplexity"]["ppl"] > final["perplexity"]["ppl"]


@pytest.mark.deepspeed
def test_cli_magic_sampling_and_comparison(trained: Run, ip: Any, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    root = str(trained.path.parent)
    assert cli(["--root", root, "eval", trained.id, "--max-blocks", "2", "--wait", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert res["perplexity"]["blocks"] == 2
    assert res["perplexity"]["ppl"] == pytest.approx(
        direct_perplexity(trained.final_model, trained, 2), rel=1e-5
    )
    # held-out text files instead of the validation split: the same computation on their tokens
    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text(encoding="utf-8")[-3000:], encoding="utf-8")
    assert cli(["--root", root, "eval", trained.id, "--files", str(held), "--wait", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert res["perplexity"]["source"] == str(held)
    assert res["perplexity"]["ppl"] == pytest.approx(
        direct_text_perplexity(trained, held.read_text()), rel=1e-5
    )
    # the magic; sampling with a seed is reproducible, and a different seed differs
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(trained.path.parent.parent))
    outs = []
    for seed in (3, 3, 4):
        ev = ip.run_line_magic("llm_eval", f"{trained.name} --max-blocks 1 --prompt 'To be' --temperature 1.5 "
                                           f"--top-k 20 --max-new-tokens 24 --seed {seed} --wait")  # fmt: skip
        assert ev.state == "completed", ev.summary()
        outs.append(ev.samples()[0]["output"])
    assert outs[0] == outs[1] != outs[2]
    # bad reference data fails the job with the file and line named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    ev = evaluate(trained, references=str(bad), wait=True, timeout=300)
    assert (
        ev.state == "failed" and f"{bad}:2" in ev.status()["error"] and "'reference'" in ev.status()["error"]
    )
    # comparison with another run's result, side by side
    other = RunStore(root).create(Spec.from_dict(trained.spec.to_dict() | {"name": "other", "seed": 7}))
    near = round(
        read_json(trained.path / "eval.json")["perplexity"]["ppl"] * 1.02, 3
    )  # bars from 0 hide this
    write_json_atomic(
        other.path / "eval.json", {"checkpoint": "final", "perplexity": {"ppl": near, "loss": 4.6}}
    )
    third = RunStore(root).create(Spec.from_dict(trained.spec.to_dict() | {"name": "third"}))
    c = compare([trained, other.id, third.id])
    assert isinstance(c, Comparison) and [r["run"] for r in c.rows] == [trained.id, other.id, third.id]
    assert c.rows[1]["ppl"] == near and c.metrics == ["ppl", "loss"]  # only metrics some run has
    assert c.rows[0]["ppl"] == pytest.approx(read_json(trained.path / "eval.json")["perplexity"]["ppl"])
    # the training numbers from each run's metrics, and where the specs differ (names aside)
    losses = [m["loss"] for m in trained.metrics() if "loss" in m]
    assert c.rows[0]["final_loss"] == losses[-1] and c.rows[0]["steps"] == trained.spec.train.max_steps
    assert c.rows[0]["best_val_loss"] == min(m["val_loss"] for m in trained.metrics() if "val_loss" in m)
    assert c.rows[2]["final_loss"] is None and c.unevaluated == ["third"]
    assert c.spec_diff == {"seed": [trained.spec.seed, 7, trained.spec.seed]}
    from jupyter_llm.display import PALETTE, comparison_html
    from jupyter_llm.widgets import CompareView

    page = comparison_html(c)
    assert "not evaluated" in page and "%llm_eval third --wait" in page and "<code>seed</code>" in page
    view = CompareView(c)
    ppl = view.bars["ppl"].marks[0]
    assert list(ppl.y) == [c.rows[0]["ppl"], near] and ppl.label_display  # values on the bars
    assert list(ppl.colors) == PALETTE[:2]  # the runs' own colours, as in the overlaid dashboard
    assert 0 < ppl.scales["y"].min < c.rows[0]["ppl"]  # a baseline near the values, not 0
    assert set(view.bars) == {"final_loss", "best_val_loss", "ppl", "loss"}
    assert view.dashboard is not None and len(view.dashboard.views) == 3
    assert cli(["--root", root, "compare", trained.id, other.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["ppl"] == near


@pytest.mark.deepspeed
def test_samples_taken_while_training_are_the_models_own_greedy_text(trained: Run) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = trained.samples()
    assert [s["step"] for s in samples] == [1, 15, 30]  # the first step, every 15, the last
    tok = AutoTokenizer.from_pretrained(trained.final_model)
    prompt = samples[0]["prompt"]  # the start of the validation text: 24 characters of the corpus
    assert len(prompt) == 24 and prompt in Path(trained.spec.data.train[0]).read_text(encoding="utf-8")
    assert all(s["prompt"] == prompt for s in samples)
    assert samples[0]["output"] != samples[-1]["output"]  # the model changed meanwhile
    # the last sample is what the exported model generates greedily (ranks and export agree)
    model = AutoModelForCausalLM.from_pretrained(trained.final_model).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert tok.decode(out[0, ids.shape[1] :].tolist()) == samples[-1]["output"]


@pytest.mark.deepspeed
def test_system_utilisation_sampled_while_it_trained(trained: Run) -> None:
    import socket

    import psutil

    lines = trained.system()
    assert len(lines) >= 3, lines  # one a second while it ran (JUPYTER_LLM_SYSTEM_EVERY_S=1 in tests)
    assert all(ln["node"] == socket.gethostname() and 0 <= ln["cpu_pct"] <= 100 for ln in lines)
    assert all(ln["mem_total_mb"] == pytest.approx(psutil.virtual_memory().total / 2**20) for ln in lines)
    assert all(0 < ln["mem_used_mb"] < ln["mem_total_mb"] and ln["gpus"] == [] for ln in lines)  # no GPU here
    # the two ranks (torch, DeepSpeed, the model) hold far more than 100 MB once they are up
    assert max(ln["ranks_rss_mb"] for ln in lines) > 100
    from jupyter_llm.widgets import Dashboard

    dash = Dashboard(trained)
    ranks, host = dash.views[0].system["memory"]
    assert len(host.x) == len(lines) and max(ranks.y) == pytest.approx(
        max(ln["ranks_rss_mb"] for ln in lines) / 1024
    )
    assert dash.system_figures["gpu"].layout.display == "none"
    dash.close()
    from jupyter_llm.summary import overview

    row = dict(overview(trained))[f"system ({socket.gethostname()})"]  # the run page's newest sample
    assert row.startswith("CPU ") and "GiB, the ranks " in row


@pytest.mark.deepspeed
def test_killed_evaluation_is_reported_lost(trained: Run) -> None:
    ev = trained.evaluate(prompts=["x"] * 200, max_new_tokens=200)
    wait_for(lambda: ev.state == "running", 120, "the evaluation to run")
    os.kill(ev.status()["pid"], signal.SIGKILL)
    wait_for(lambda: ev.state == "failed", 30, "the killed evaluation to read as failed")
    st = ev.status()
    assert st["state"] == "failed" and st["lost"] and "is gone" in st["error"]


def test_bad_evaluation_requests_fail_before_starting(corpus: Path, tmp_path: Path) -> None:
    run = RunStore().create(Spec.from_dict(tiny_spec(corpus)))
    with pytest.raises(RunStateError, match="no final model"):
        evaluate(run)
    with pytest.raises(RunStateError, match="no complete checkpoint"):
        evaluate(run, checkpoint="latest")
    with pytest.raises(SpecError, match="references"):
        evaluate(run, references=str(tmp_path / "missing.jsonl"))
    with pytest.raises(SpecError, match="temperature"):
        evaluate(run, top_k=5)
    with pytest.raises(SpecError, match="checkpoint"):
        evaluate(run, checkpoint="best")
    (run.path / "checkpoints" / "step00000010").mkdir(parents=True)
    write_json_atomic(run.path / "checkpoints" / "step00000010" / CKPT_MARKER, {"step": 10})
    with pytest.raises(UserError, match=r"no complete checkpoint at step 5; it has \[10\]"):
        evaluate(run, checkpoint=5)
    assert not (run.path / "evals").exists()  # nothing was started
    masked = tiny_spec(corpus, model={"task": "masked-lm", "config": None}, eval={"prompts": ["hi"]})
    with pytest.raises(SpecError, match="generation needs a causal-lm"):
        Spec.from_dict(masked)
