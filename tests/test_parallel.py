"""Tensor (model) parallelism through DeepSpeed's AutoTP on 2 CPU ranks over gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_deepspeed import finished, losses, wait_for

from conftest import tiny_spec
from jupyter_llm import launch
from jupyter_llm.errors import UserError
from jupyter_llm.spec import Spec, SpecError, deepspeed_config

pytestmark = pytest.mark.deepspeed

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


def llama_spec(corpus: Path, procs: int, tp: int, **train: object) -> dict:
    return tiny_spec(
        corpus,
        name=f"tp{tp}",
        model={"task": "causal-lm", "config": LLAMA},
        train={"micro_batch_size": 4, "max_steps": 50, "log_every": 1, "eval_every": 25, "save_every": 0,
               "grad_norms_every": 10, "precision": "fp32", **train},
        distributed={"procs_per_node": procs, "zero_stage": 1, "tensor_parallel": tp},
    )  # fmt: skip


def grad_norms(run) -> dict[int, dict[str, float]]:
    lines = (run.path / "grads.jsonl").read_text().splitlines()
    return {r["step"]: r["norms"] for r in map(json.loads, lines)}


def test_tensor_parallel_matches_one_rank_resumes_and_exports_whole(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 ranks splitting every layer in two (no data parallelism) train the same curve as 1
    rank without TP while stopped three times: resumed from its TP-sharded checkpoint as it
    is, then on 1 rank without TP, then on 2 with TP again (both through the universal
    format); and export one ordinary from_pretrained folder that gives the run's own logits."""
    ref = launch(llama_spec(corpus, 1, 1))
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "step_delay_ms:150")  # a stop lands mid-run
    run = launch(llama_spec(corpus, 2, 2))
    stops = []
    for at, layout in ((10, []), (20, ["distributed.procs_per_node=1", "distributed.tensor_parallel=1"]),
                       (30, ["distributed.procs_per_node=2", "distributed.tensor_parallel=2"])):  # fmt: skip
        wait_for(lambda at=at: any(m.get("step", 0) >= at for m in run.metrics()), what=f"step {at}")
        assert run.stop(wait=True, timeout=180) == "stopped"
        stops.append([e for e in run.events() if e["event"] == "stopped_at"][-1]["step"])
        if not stops[1:]:
            ck = run.checkpoints()[-1]
            assert sorted(p.name for p in ck.glob("mp_rank_*_model_states.pt")) == [
                "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"
            ]  # one slice of the model per tensor-parallel rank  # fmt: skip
        run.resume(layout)
    assert finished(run)["state"] == "completed"
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    assert finished(ref)["state"] == "completed"
    conv = [(e["from"], e["to"]) for e in run.events() if e["event"] == "checkpoint_converted"]
    assert conv == [({"ranks": 2, "tensor_parallel": 2}, {"ranks": 1, "tensor_parallel": 1}),
                    ({"ranks": 1, "tensor_parallel": 1}, {"ranks": 2, "tensor_parallel": 2})]  # fmt: skip

    mine, base = losses(run), losses(ref)
    assert sorted(mine) == sorted(base) == list(range(1, 51))
    for step in base:
        assert mine[step] == pytest.approx(base[step], rel=1e-3), step
    for attempt, stopped in enumerate(stops, start=2):
        assert min(losses(run, attempt=attempt)) == stopped + 1  # resumed where it stopped
    assert base[50] < base[1] - 0.5  # and it learns
    # the per-layer gradient norms count a split weight's slices together, a replicated one once
    tn, bn = grad_norms(run), grad_norms(ref)
    assert tn.keys() == bn.keys() and tn
    for step in bn:
        assert tn[step].keys() == bn[step].keys()
        for layer, v in bn[step].items():
            assert tn[step][layer] == pytest.approx(v, rel=1e-3), (step, layer)
    m = [r for r in run.metrics() if "loss" in r][-1]
    r = [r for r in ref.metrics() if "loss" in r][-1]
    # tokens counted once per replica (one here), not once per rank
    assert m["tokens"] == r["tokens"] == 50 * 4 * 32

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run.path / "final")
    assert tuple(model.model.layers[0].self_attn.q_proj.weight.shape) == (64, 64)  # whole, not [32, 64]
    check = torch.load(run.path / "export_check.pt")
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits
    assert torch.allclose(logits, check["logits"], atol=1e-4)


def test_tensor_parallel_spec_checks(corpus: Path) -> None:
    """What AutoTP cannot split is refused before anything starts, naming the setting."""
    with pytest.raises(SpecError) as e:
        Spec.from_dict(llama_spec(corpus, 3, 2))
    assert "must divide distributed.procs_per_node (3)" in str(e.value)
    bad = llama_spec(corpus, 2, 2)
    bad["distributed"]["zero_stage"] = 3
    with pytest.raises(SpecError, match="combines with zero_stage 0, 1 or 2"):
        Spec.from_dict(bad)
    cfg = deepspeed_config(Spec.from_dict(llama_spec(corpus, 2, 2)))
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    # 3 key/value heads do not split in two: refused at launch, from the model's shape
    odd = llama_spec(corpus, 2, 2)
    odd["model"]["config"] = {**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}
    with pytest.raises(UserError, match=r"key/value heads \(3\) do not divide by 2"):
        launch(odd)
    from jupyter_llm.preflight import dry_run

    dr = dry_run(Spec.from_dict(llama_spec(corpus, 2, 2)))
    (c,) = [c for c in dr.checks if c.name == "tensor parallel"]
    assert (
        c.ok and "2 rank(s) = 1 data-parallel x 2 tensor-parallel" in c.detail and "2 of 4 heads" in c.detail
    )


def _committed_samples(run, stops: dict[int, int]) -> list[int]:
    """Every sample index the ranks read in steps that count: an attempt's steps up to where
    it stopped (its checkpoint), the last attempt's all."""
    out: list[int] = []
    for f in sorted((run.path / "logs").glob("samples.rank*.txt")):
        for line in f.read_text().splitlines():
            attempt, step, first, count = map(int, line.split())
            if step <= stops.get(attempt, 10**9):
                out += range(first, first + count)
    return sorted(out)


def test_resume_on_other_world_sizes(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-rank ZeRO-2 run stopped and resumed on 1 rank, stopped again and resumed on 2: the
    checkpoint goes through DeepSpeed's universal format each time (said in an event), the
    loss continues, and every sample of the epoch is read exactly once."""
    monkeypatch.setenv("JUPYTER_LLM_TRACE", "samples")
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "step_delay_ms:150")
    spec = tiny_spec(corpus, name="relayout",
                     train={"max_steps": 60, "log_every": 1, "eval_every": 0, "save_every": 0, "micro_batch_size": 8})  # fmt: skip
    run = launch(spec)
    stops: dict[int, int] = {}
    for attempt, procs, at in ((1, 2, 12), (2, 1, 12 + 10)):
        wait_for(lambda at=at: any(m.get("step", 0) >= at for m in run.metrics()), what=f"step {at}")
        assert run.stop(wait=True, timeout=180) == "stopped"
        stops[attempt] = [e for e in run.events() if e["event"] == "stopped_at"][-1]["step"]
        if attempt == 1:  # what a resume may change: where it runs, not what it trains
            with pytest.raises(UserError, match=r"resume cannot change optim\.lr"):
                run.resume(["optim.lr=1"])
        run.resume([f"distributed.procs_per_node={3 - procs}"])
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    assert finished(run)["state"] == "completed"

    conv = [e for e in run.events() if e["event"] == "checkpoint_converted"]
    assert [(c["step"], c["from"]["ranks"], c["to"]["ranks"]) for c in conv] == [
        (stops[1], 2, 1),
        (stops[2], 1, 2),
    ]
    changes = [e["changes"] for e in run.events() if e["event"] == "resume_overrides"]
    assert changes == [{"distributed.procs_per_node": {"from": 2, "to": 1}},
                       {"distributed.procs_per_node": {"from": 1, "to": 2}}]  # fmt: skip
    assert run.spec.distributed.procs_per_node == 2

    final = [m for m in run.metrics() if "loss" in m][-1]
    # 2 ranks x 8 up to the first stop, 1 x 8 to the second, 2 x 8 to the end
    total = 16 * stops[1] + 8 * (stops[2] - stops[1]) + 16 * (60 - stops[2])
    assert final["step"] == 60 and final["samples"] == total
    assert _committed_samples(run, stops) == list(range(total))  # each once, none skipped

    by_attempt = {a: losses(run, attempt=a) for a in (1, 2, 3)}
    for a in (2, 3):
        first = by_attempt[a][min(by_attempt[a])]
        before = [v for s, v in sorted(by_attempt[a - 1].items()) if s <= stops[a - 1]][-3:]
        assert min(by_attempt[a]) == stops[a - 1] + 1
        assert abs(first - sum(before) / 3) < 0.3, (a, first, before)  # no jump back to the start
    assert by_attempt[3][60] < by_attempt[1][1] - 0.8
