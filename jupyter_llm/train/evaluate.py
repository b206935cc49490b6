"""The evaluation job: `python -m jupyter_llm.train.evaluate EVAL_DIR [--detach]`.

One process, no DeepSpeed engine. Reads RUN/evals/<id>/request.json; loads the run's final
model (a from_pretrained folder) or a checkpoint (DeepSpeed's files, consolidated to fp32 on
CPU); measures perplexity on held-out blocks (the run's validation split, or given text files),
masked-token accuracy for masked LMs, generates from prompts, and scores BLEU (sacrebleu) and
ROUGE-1/2/L (rouge-score) against references; writes eval.json and samples.jsonl, and copies
eval.json to the run folder. It reports its own state in status.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..files import append_jsonl, now_iso, read_json, write_json_atomic
from ..folder import FINAL_DIR, SPEC_FILE


def main(eval_dir: Path) -> None:
    status = eval_dir / "status.json"
    st = read_json(status) or {}
    signal.signal(signal.SIGTERM, _terminated)
    import psutil

    me = psutil.Process()
    write_json_atomic(status, {**st, "state": "running", "pid": me.pid, "pid_create_time": me.create_time(),
                               "started_at": now_iso()})  # fmt: skip
    try:
        result = evaluate(eval_dir)
    except BaseException as e:
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        error = None if state == "stopped" else f"{type(e).__name__}: {e}"
        write_json_atomic(
            status, {**(read_json(status) or {}), "state": state, "error": error, "ended_at": now_iso()}
        )
        if state == "failed":
            import traceback

            traceback.print_exc()
        sys.exit(1 if state == "failed" else 0)
    write_json_atomic(eval_dir / "eval.json", result)
    run_dir = eval_dir.parent.parent
    shutil.copyfile(eval_dir / "eval.json", run_dir / ".eval.json.tmp")
    os.replace(run_dir / ".eval.json.tmp", run_dir / "eval.json")  # the run's newest result
    _card_and_report(run_dir)
    write_json_atomic(status, {**(read_json(status) or {}), "state": "completed", "ended_at": now_iso()})
    print(json.dumps(result, indent=1))


def _card_and_report(run_dir: Path) -> None:
    """The model card carries the newest evaluation of the final model; report_to gets the result."""
    from ..card import write
    from ..folder import RunFolder
    from ..report import report

    run = RunFolder(run_dir)
    try:
        write(run)
        if run.spec.report_to:
            for line in report(run):
                print(line, flush=True)
    except Exception as e:  # the evaluation stands; its report is what is missing
        print(f"card/report: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("stopped")


def evaluate(eval_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from ..spec import EvalSpec, Spec

    t0 = time.time()
    run_dir = eval_dir.parent.parent
    req = EvalSpec.model_validate(read_json(eval_dir / "request.json") or {})
    spec = Spec.from_yaml((run_dir / SPEC_FILE).read_text())
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(
        run_dir / "final" if req.checkpoint == "final" else run_dir / "tokenizer"
    )
    model, label, step = load_model(run_dir, spec, tok, req.checkpoint)
    model.eval()
    print(f"evaluating {label} (step {step}) of {run_dir.name}", flush=True)
    result: dict[str, Any] = {"run_id": run_dir.name, "eval_id": eval_dir.name, "checkpoint": label, "step": step,
                              "task": spec.model.task, "request": req.model_dump(mode="json")}  # fmt: skip
    with torch.no_grad():
        if spec.model.task == "masked-lm":
            result["masked"], result["perplexity"] = masked_scores(run_dir, spec, tok, model, req)
        else:
            result["perplexity"] = perplexity(run_dir, spec, tok, model, req)
        samples: list[dict[str, Any]] = [{"prompt": p, "reference": None} for p in req.prompts]
        if req.references:
            samples += read_references(Path(req.references), req.prompt_field, req.reference_field)
        for s in samples:
            s["output"] = generate(model, tok, s["prompt"], req)
            append_jsonl(eval_dir / "samples.jsonl", s)
    result["samples"] = len(samples)
    scored = [s for s in samples if s["reference"] is not None]
    if scored:
        result.update(text_scores([s["output"] for s in scored], [s["reference"] for s in scored]))
        result["n_references"] = len(scored)
    result["seconds"] = round(time.time() - t0, 3)
    result["time"] = now_iso()
    return result


def load_model(run_dir: Path, spec: Any, tok: Any, checkpoint: int | str) -> tuple[Any, str, int]:
    """The final model, or a checkpoint's weights (fp32) in a freshly built model."""
    import transformers as tf

    from . import checkpoint as ck
    from .model import build_model

    if checkpoint == "final":
        auto = tf.AutoModelForCausalLM if spec.model.task == "causal-lm" else tf.AutoModelForMaskedLM
        return auto.from_pretrained(run_dir / FINAL_DIR), "final", spec.train.max_steps
    found = ck.complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{run_dir.name} has no complete checkpoint")
    chosen = found[-1] if checkpoint == "latest" else next((c for c in found if c[0] == checkpoint), None)
    if chosen is None:
        raise FileNotFoundError(f"no complete checkpoint at step {checkpoint}; have {[s for s, _ in found]}")
    step, path = chosen
    model = build_model(spec, tok)
    model.load_state_dict(checkpoint_state(path, spec.distributed.zero_stage), strict=True)
    return model, f"step-{step}", step


def checkpoint_state(path: Path, zero_stage: int) -> dict[str, Any]:
    """A DeepSpeed checkpoint's model weights in fp32: ZeRO 1-3 from the optimizer's fp32
    partitions (DeepSpeed's zero_to_fp32), ZeRO 0 from the module state."""
    import torch

    if zero_stage == 0:
        return dict(
            torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        )
    from .deps import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))


def prepared_data(run_dir: Path, spec: Any) -> tuple[Path, dict[str, Any]]:
    """The run's prepared data folder and its index. When the cache it names is gone (cleaned,
    or the run folder came from another machine), the data is prepared again from the spec
    and the run's own tokenizer: it is a function of the two, so the split is the same."""
    data = read_json(run_dir / "data.json")
    if data is None:
        raise FileNotFoundError(f"{run_dir.name} has no prepared data (data.json); give files=[...]")
    path = Path(data["path"])
    index = read_json(path / "index.json")
    if index is None:
        from .data import data_stage

        data_stage(run_dir, spec)
        path = Path((read_json(run_dir / "data.json") or {})["path"])
        index = read_json(path / "index.json") or {}
    return path, index


def heldout_tokens(run_dir: Path, spec: Any, tok: Any, req: Any) -> tuple[Any, Any, str]:
    """Tokens (and loss mask, if any) of the held-out text: given files, or the validation split."""
    import numpy as np

    if req.files:
        eos = tok.eos_token_id
        ids: list[int] = []
        for f in req.files:
            ids += tok(Path(f).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
        return np.asarray(ids, dtype=np.int64), None, ", ".join(req.files)
    path, index = prepared_data(run_dir, spec)
    tokens = np.fromfile(path / "val.bin", dtype=index["dtype"]).astype(np.int64)
    mask = np.fromfile(path / "val.mask", dtype=np.uint8) if (path / "val.mask").is_file() else None
    return tokens, mask, "validation split"


def perplexity(run_dir: Path, spec: Any, tok: Any, model: Any, req: Any) -> dict[str, Any]:
    """exp(mean NLL per predicted token) over consecutive blocks of data.block_size tokens."""
    import torch

    tokens, mask, source = heldout_tokens(run_dir, spec, tok, req)
    b = spec.data.block_size
    n = len(tokens) // b
    if req.max_blocks:
        n = min(n, req.max_blocks)
    if n == 0:
        raise ValueError(
            f"the held-out text ({source}) has {len(tokens)} tokens: fewer than one block of {b}"
        )
    blocks = torch.from_numpy(tokens[: n * b].reshape(n, b))
    keep_all = None if mask is None else torch.from_numpy(mask[: n * b].reshape(n, b).astype(bool))
    nll, count = 0.0, 0
    for i in range(0, n, req.batch_size):
        ids = blocks[i : i + req.batch_size]
        logits = model(input_ids=ids).logits.float()[:, :-1]
        labels = ids[:, 1:]
        keep = (
            torch.ones_like(labels, dtype=torch.bool)
            if keep_all is None
            else keep_all[i : i + req.batch_size, 1:]
        )
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   reduction="none").view_as(labels)  # fmt: skip
        nll += float(losses[keep].double().sum())
        count += int(keep.sum())
    loss = nll / max(1, count)
    return {"source": source, "blocks": n, "tokens": count, "loss": loss, "ppl": math.exp(min(loss, 700.0))}


def masked_scores(
    run_dir: Path, spec: Any, tok: Any, model: Any, req: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Masked-token accuracy and the masked tokens' loss (its exp as perplexity), with the
    training masking (BERT 80/10/10) at a fixed seed over the validation split's blocks."""
    import torch

    from .data import Blocks
    from .loop import mlm_inputs

    path, index = prepared_data(run_dir, spec)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    blocks = Blocks(path / "val.bin", index["dtype"], spec.data.block_size - 2, spec.seed, pad)
    n = min(blocks.n, req.max_blocks or blocks.n)
    if n == 0:
        raise ValueError("the validation split has no block; evaluate with more validation text")
    nll, correct, count = 0.0, 0, 0
    for i in range(0, n, req.batch_size):
        k = min(req.batch_size, n - i)
        ids = torch.from_numpy(blocks.batch(i, k, False).astype("int64"))
        b = mlm_inputs(ids, blocks.lengths(i, k, False), tok, spec.data.mlm_probability, req.seed + i)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        keep = b["labels"] != -100
        lg, lb = logits[keep], b["labels"][keep]
        nll += float(torch.nn.functional.cross_entropy(lg, lb, reduction="sum"))
        correct += int((lg.argmax(-1) == lb).sum())
        count += int(keep.sum())
    loss = nll / max(1, count)
    masked = {"accuracy": correct / max(1, count), "tokens": count, "loss": loss, "blocks": n}
    return masked, {"source": "validation split (masked tokens)", "blocks": n, "tokens": count, "loss": loss,
                    "ppl": math.exp(min(loss, 700.0))}  # fmt: skip


def generate(model: Any, tok: Any, prompt: str, req: Any) -> str:
    """The continuation of `prompt` (greedy at temperature 0, else sampled with the seed)."""
    import torch

    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    limit = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    new = req.max_new_tokens
    if limit:
        new = min(new, limit - 1)
        ids = ids[:, -(limit - new) :]  # keep the prompt's end when prompt + output exceed the context
    sample = req.temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample}
    if sample:
        kwargs.update(temperature=req.temperature, top_k=req.top_k or 0, top_p=req.top_p or 1.0)
    torch.manual_seed(req.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         pad_token_id=pad, **kwargs)  # fmt: skip
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def read_references(path: Path, prompt_field: str, reference_field: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            missing = [k for k in (prompt_field, reference_field) if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{n}: no string field {missing[0]!r} (fields: {', '.join(row)})")
            out.append({"prompt": row[prompt_field], "reference": row[reference_field]})
    if not out:
        raise ValueError(f"{path}: no reference lines")
    return out


def text_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (rouge-score, 0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
    out = {"bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score)}
    for k in ("rouge1", "rouge2", "rougeL"):
        out[k] = sum(s[k].fmeasure for s in rouge) / len(rouge)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) > 2 or (len(args) == 2 and args[1] != "--detach"):
        sys.exit("usage: python -m jupyter_llm.train.evaluate EVAL_DIR [--detach]")
    target = Path(args[0]).resolve()
    if "--detach" in args:  # the caller returns at once; the job lives in a session of its own
        from ..detach import detach

        detach(target, "eval.log")
    main(target)
