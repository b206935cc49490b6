"""jupyter_llm against a plain single-file PyTorch loop (no DeepSpeed): `python bench/vs_plain.py`.

Shakespeare-char: a GPT-2-style model (4 layers, 4 heads, 128 wide, block 64, learned positions,
tied head, tanh GELU, biases, dropout off) for 2,000 steps of 12 blocks; AdamW (lr 1e-3, cosine to
1e-4 after 100 linear warmup steps, betas 0.9/0.99, weight decay 0.1 on matrices, clipping at
1.0); the last 10 % of the characters to validate, 20 batches every 250 steps; non-overlapping
blocks in a seeded order per epoch on both sides. One process, all cores, on both sides. The
plain side is this file's own loop (`--plain`). Wall time is what a user waits: ours from
`launch` to `completed` (final model exported), the plain loop from its process start to its
last validation. Repetitions alternate which side goes first. Prints JSON: wall times, their
ratio, both final validation losses.

    python bench/vs_plain.py [--reps 2] [--steps 2000] [--compile]

--compile: `train.compile: true` on our side, `torch.compile(model)` on the plain side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"
LAYERS, HEADS, EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, EVAL_EVERY, EVAL_BATCHES, LOG = 1e-3, 1e-4, 100, 250, 20, 50


def spec(steps: int, compile: bool = False) -> dict:
    return {
        "name": "vs-plain",
        "seed": 1337,
        "model": {"config": {"model_type": "gpt2", "n_layer": LAYERS, "n_head": HEADS, "n_embd": EMBD,
                             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(CORPUS)], "block_size": BLOCK, "val_fraction": 0.1},
        "train": {"micro_batch_size": BATCH, "max_steps": steps, "log_every": LOG, "eval_every": EVAL_EVERY,
                  "eval_batches": EVAL_BATCHES, "save_every": 0, "precision": "fp32",
                  "compile": compile},
        "optim": {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "scheduler": "cosine"},
        "distributed": {"procs_per_node": 1, "zero_stage": 0},
    }  # fmt: skip


def run_ours(steps: int, compile: bool) -> dict:
    import jupyter_llm

    t0 = time.time()
    run = jupyter_llm.launch(spec(steps, compile))
    state = run.wait(3600)
    wall = time.time() - t0
    if state != "completed":
        sys.exit(f"jupyter_llm run {run.id} ended {state}: {run.status().get('error')}")
    vals = [m["val_loss"] for m in run.metrics() if "val_loss" in m]
    marks = phases(run, t0)
    return {
        "wall_s": wall,
        "val_loss": vals[-1],
        "run": run.id,
        "phases_s": marks,
        "step_ms": step_ms(marks, steps),
    }


def phases(run, t0: float) -> dict[str, float]:
    """Where our wall time went, from the run's own events and metric lines: from `launch` to
    each mark, in seconds (the fixed part is everything but first_step -> last_step)."""
    from datetime import datetime

    def at(iso: str) -> float:
        return datetime.fromisoformat(iso).timestamp() - t0

    marks = {}
    for e in run.events():
        if e["event"] in ("launched", "data_ready", "model_ready", "exported", "completed"):
            marks.setdefault(e["event"], at(e["time"]))
    train = [m for m in run.metrics() if "loss" in m and "time" in m]
    if train:
        marks["first_log"], marks["last_log"] = train[0]["time"] - t0, train[-1]["time"] - t0
    return {k: round(v, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}


def run_plain(steps: int, compile: bool) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, "--plain", "--steps", str(steps), *(["--compile"] if compile else [])],
                         capture_output=True, text=True, check=True)  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    marks = {k: round(res.pop(k) - t0, 2) for k in ("first_log", "last_log")}
    return {"wall_s": time.time() - t0, **res, "phases_s": marks, "step_ms": step_ms(marks, steps)}


def step_ms(marks: dict[str, float], steps: int) -> float | None:
    """Milliseconds a step from the first log (step LOG) to the last: the per-step part of the
    wall time, evaluations included; what is left of the wall time is the fixed part."""
    if "first_log" not in marks or "last_log" not in marks:
        return None
    return round((marks["last_log"] - marks["first_log"]) / (steps - LOG) * 1000, 2)


def plain(steps: int, compile: bool) -> None:
    """The plain loop: a GPT in ~40 lines of PyTorch, trained and validated as described above."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(1337)
    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = np.searchsorted(np.array(chars), np.array(list(text))).astype(np.int64)
    n_val = int(len(ids) * 0.1)
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    train_blocks = torch.from_numpy(train_ids[: len(train_ids) // BLOCK * BLOCK].reshape(-1, BLOCK))
    val_blocks = torch.from_numpy(val_ids[: len(val_ids) // BLOCK * BLOCK].reshape(-1, BLOCK))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(EMBD), nn.LayerNorm(EMBD)
            self.qkv, self.proj = nn.Linear(EMBD, 3 * EMBD), nn.Linear(EMBD, EMBD)
            self.up, self.down = nn.Linear(EMBD, 4 * EMBD), nn.Linear(4 * EMBD, EMBD)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(EMBD, dim=2)
            q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
            x = x + self.proj(y)
            return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(len(chars), EMBD), nn.Embedding(BLOCK, EMBD)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln = nn.LayerNorm(EMBD)
            for name, p in self.named_parameters():  # GPT-2's initialisation
                if p.dim() >= 2:
                    std = (
                        0.02 / math.sqrt(2 * LAYERS)
                        if name.endswith(("proj.weight", "down.weight"))
                        else 0.02
                    )
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.ln(x) @ self.tok.weight.T  # tied head

    model = GPT()
    if compile:
        model.compile()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.99), eps=1e-8)  # fmt: skip

    def lr_at(step: int) -> float:  # step counts from 0, as the scheduler's does
        if step < WARMUP:
            return LR * step / WARMUP
        frac = (step - WARMUP) / max(steps - WARMUP, 1)
        return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * frac))

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        losses = [loss_of(val_blocks[i * BATCH : (i + 1) * BATCH]).item() for i in range(EVAL_BATCHES)]
        model.train()
        return sum(losses) / len(losses)

    rng = np.random.default_rng(1337)
    order, pos, val = rng.permutation(len(train_blocks)), 0, validate()
    marks = {}  # when step LOG (our side's first log line) and the last step end
    for step in range(steps):
        if pos + BATCH > len(order):
            order, pos = rng.permutation(len(train_blocks)), 0
        batch = train_blocks[order[pos : pos + BATCH]]
        pos += BATCH
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 == LOG or step + 1 == steps:
            loss.item()  # (ours logs the loss: a sync there too)
            marks["first_log" if step + 1 == LOG else "last_log"] = time.time()
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            val = validate()
    print(json.dumps({"val_loss": val, "threads": torch.get_num_threads(), **marks}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--plain", action="store_true", help="run the plain loop in this process")
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    args = ap.parse_args()
    if args.plain:
        return plain(args.steps, args.compile)
    from scale import warm_ops  # bench/scale.py: DeepSpeed's ops built before anything is timed

    warm_ops("ShareMemCommBuilder")  # the op a ZeRO-0/2 CPU run loads (Adam: torch's)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("JUPYTER_LLM_HOME", tmp)
        ours, base = [], []
        for rep in range(args.reps):
            for who in ("plain", "ours") if rep % 2 == 0 else ("ours", "plain"):
                (base if who == "plain" else ours).append(
                    run_plain(args.steps, args.compile)
                    if who == "plain"
                    else run_ours(args.steps, args.compile)
                )
                print(json.dumps({who: (base if who == "plain" else ours)[-1]}), file=sys.stderr, flush=True)
    ratios = [o["wall_s"] / b["wall_s"] for o, b in zip(ours, base, strict=True)]
    print(json.dumps({"benchmark": "vs_plain", "steps": args.steps, "compile": args.compile, "ours": ours, "plain": base,
                      "wall_ratios": ratios, "median_wall_ratio": statistics.median(ratios),
                      "median_step_ms": {"ours": statistics.median(o["step_ms"] for o in ours),
                                         "plain": statistics.median(b["step_ms"] for b in base)}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
