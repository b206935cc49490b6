"""The worker: one process per rank, started by DeepSpeed's launcher.

Reads top to bottom: ranks from the environment, data, tokenizer, model, DeepSpeed engine,
automatic resume, the loop (log / eval / save / stop checks), final export. Only rank 0
writes metrics, events and the final model.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..files import append_jsonl, write_json_atomic
from ..folder import (
    DS_CONFIG_FILE,
    FINAL_DIR,
    GRADS_FILE,
    METRICS_FILE,
    PARENT_ENV,
    SAMPLES_FILE,
    SPEC_FILE,
    Event,
    record_event,
)
from ..summary import metrics_text
from .faults import fault


def main(run_dir: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    redirect_output(run_dir / "logs" / f"rank{rank}.log")
    _record_rank(run_dir, rank, local_rank)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        train(run_dir, rank, world, local_rank)
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            record_failure(run_dir, rank, e)
        raise
    # every file of the run is written and closed, and every rank is past the last barrier:
    # skip the interpreter's teardown of torch, DeepSpeed and gloo, which the launcher (and so
    # the run's end) would wait for; the record says this rank is done, so the supervisor need
    # not wait for the launcher either
    _record_rank(run_dir, rank, local_rank, done=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(run_dir: Path, rank: int, world: int, local_rank: int) -> None:
    from ..spec import Spec, on_cpu, resolve_auto

    # validated at launch; on a remote node the data files are not there (prepared data is)
    spec = Spec.from_yaml((run_dir / SPEC_FILE).read_text(), check_files=False)
    malloc_thresholds(spec)  # before the first tensor
    from .deps import import_deepspeed

    deepspeed = import_deepspeed()  # first: every later `deepspeed` import finds it loaded
    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer  # every rank, in parallel: not after the barrier

    from . import checkpoint
    from .data import Blocks, data_stage
    from .model import build_model, compile_blocks, flops_per_token, meta_shape, param_groups, peak_flops

    ds_config = json.loads((run_dir / DS_CONFIG_FILE).read_text())
    t, d, masked = spec.train, spec.data, spec.model.task == "masked-lm"
    master = rank == 0
    attempt = int(os.environ.get("JUPYTER_LLM_ATTEMPT", "1"))

    deepspeed.init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        if cap := os.environ.get("JUPYTER_LLM_GPU_MEMORY_FRACTION"):  # the share of the GPU this job may use
            torch.cuda.set_per_process_memory_fraction(float(cap), device)
    else:
        ds_config = on_cpu(ds_config)

    # -- tokenizer and data: rank 0 prepares once, the others wait and reuse ---------------
    tok_dir = run_dir / "tokenizer"
    if master and not os.environ.get("JUPYTER_LLM_DATA_READY"):  # set where the supervisor prepared it
        data_stage(run_dir, spec)  # a cache hit when a prepare job (or an earlier run) did it
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    data_dir = run_dir / json.loads((run_dir / "data.json").read_text())["path"]  # absolute, or in the run
    index = json.loads((data_dir / "index.json").read_text())
    body = d.block_size - 2 if masked else d.block_size  # masked blocks get [CLS] ... [SEP]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_blocks = Blocks(data_dir / "train.bin", index["dtype"], body, spec.seed, pad)
    val_blocks = Blocks(data_dir / "val.bin", index["dtype"], body, spec.seed, pad)
    if train_blocks.n == 0:
        raise ValueError(
            f"training text has {index['splits']['train']['tokens']} tokens: fewer than one block "
            f"of data.block_size={d.block_size}; add text or lower data.block_size"
        )
    has_val = val_blocks.n > 0

    # -- model and engine -----------------------------------------------------------------
    if spec.distributed.zero_stage == 3:  # buffers sized from the model's shape (the "auto" values)
        ds_config = resolve_auto(ds_config, meta_shape(spec, len(tok)))
        if master:
            write_json_atomic(run_dir / "ds_config.resolved.json", ds_config)
    tp = spec.distributed.tensor_parallel
    found = _saved_elsewhere(run_dir, spec, world, tp)  # the newest checkpoint, when on other ranks
    universal = found is not None
    if found is not None:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        if master:
            out, secs = checkpoint.to_universal(found[1])
            saved = checkpoint.layout(found[2])
            record_event(run_dir, Event.CHECKPOINT_CONVERTED, step=found[0], path=str(out),
                         to={"ranks": world, "tensor_parallel": tp}, seconds=round(secs, 1),
                         **{"from": {"ranks": saved[0], "tensor_parallel": saved[1]}})  # fmt: skip
        dist.barrier()
    # ZeRO-0 in fp32 (no tensor parallelism): the step's gradient clipping is done here, by torch's
    # foreach clip, not by DeepSpeed's: three small ops per parameter and an all-reduce of a norm
    # that every replica already has (their gradients are averaged), and no norm kept for the
    # metrics on this path. The same rule: the total 2-norm before clipping, scaled to max_norm.
    clip = worker_clip(ds_config)
    own_clip = clip > 0
    if own_clip:
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = build_model(spec, tok, ds_config)  # partitioned as it is built under ZeRO-3
    fpt = flops_per_token(model, d.block_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, spec.optim.weight_decay), config=ds_config
    )
    if spec.distributed.zero_stage == 0 and world == 1:
        # one replica: DeepSpeed would still flatten, all-reduce over one rank and copy back
        # every gradient at each step (measured: 4.7 % of a small GPT's step)
        engine.enable_backward_allreduce = False
    # no KV cache while training: Transformers' causal LMs build one at each forward by default
    # (the exported config keeps the model's own setting)
    use_cache = getattr(engine.module.config, "use_cache", None)
    if use_cache is not None:
        engine.module.config.use_cache = False
    # compiled in place (nn.Module.compile: the state dict keeps its names), block by block;
    # DeepSpeed's engine.compile() (the whole module) where the model repeats no block
    if t.compile:
        blocks = compile_blocks(engine.module)
        if not blocks:
            engine.compile(compile_kwargs={"dynamic": False})
        if master:
            what = f"{blocks} repeated blocks" if blocks else "the whole model (no repeated blocks)"
            print(f"[jupyter-llm] torch.compile: {what}; the first steps wait for the compiler", flush=True)
    # tensor parallelism: DeepSpeed groups consecutive ranks (a node's) into groups of `tp`
    # that see one batch; data parallelism runs across the groups
    dp_rank, dp_world = rank // tp, world // tp
    torch.manual_seed(spec.seed + dp_rank)  # per-replica dropout / masking streams
    np.random.seed(spec.seed + dp_rank)

    def batch(blocks: Blocks, first: int, shuffle: bool, mask_seed: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(blocks.batch(first, t.micro_batch_size, shuffle))
        if not masked:
            loss_mask = blocks.mask_batch(first, t.micro_batch_size, shuffle)
            if loss_mask is None:
                return {"input_ids": ids.to(device), "labels": ids.to(device)}
            # prompt/response pairs: the loss counts response tokens only; a sum over the
            # counted tokens, divided by their number (at least 1: a block may hold none)
            labels = ids.masked_fill(~torch.from_numpy(loss_mask), -100)
            n = (labels[:, 1:] != -100).sum().clamp(min=1)
            return {
                "input_ids": ids.to(device),
                "labels": labels.to(device),
                "num_items_in_batch": n.to(device),
            }
        lens = blocks.lengths(first, t.micro_batch_size, shuffle)
        return {k: v.to(device) for k, v in mlm_inputs(ids, lens, tok, d.mlm_probability, mask_seed).items()}

    per_step = dp_world * t.micro_batch_size  # samples per micro step, all replicas
    trace = os.environ.get("JUPYTER_LLM_TRACE") == "samples"  # tests: which samples each rank read

    def samples_at(step: int) -> int:
        """Samples read by all ranks when `step` ends: the data position, counted in samples so
        that a resume on other ranks (another batch per step) continues it exactly."""
        return base_samples + (step - start_step) * t.grad_accum * per_step

    def train_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        first = samples_at(step - 1) + micro * per_step + dp_rank * t.micro_batch_size
        if trace:
            with open(run_dir / "logs" / f"samples.rank{rank}.txt", "a") as f:
                f.write(f"{attempt} {step} {first} {t.micro_batch_size}\n")
        return batch(train_blocks, first, True, _seed(spec.seed, step, micro, dp_rank))

    def evaluate() -> dict[str, float]:
        engine.eval()
        nll = torch.zeros(3, dtype=torch.float64, device=device)  # sum nll, tokens, correct
        n_batches = max(1, min(t.eval_batches, val_blocks.n // per_step))
        with torch.no_grad():
            for i in range(n_batches):
                b = batch(
                    val_blocks,
                    i * per_step + dp_rank * t.micro_batch_size,
                    False,
                    _seed(spec.seed, -1, i, dp_rank),
                )
                logits = engine(
                    input_ids=b["input_ids"], attention_mask=b.get("attention_mask")
                ).logits.float()
                labels = b["labels"]
                if not masked:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                keep = labels != -100
                lg, lb = logits[keep], labels[keep]
                nll[0] += torch.nn.functional.cross_entropy(lg, lb, reduction="sum").double()
                nll[1] += keep.sum()
                nll[2] += (lg.argmax(-1) == lb).sum()
        dist.all_reduce(nll)  # (each replica's sums counted tp times: the ratios are the same)
        engine.train()
        val_loss = (nll[0] / nll[1].clamp(min=1)).item()
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_acc": (nll[2] / nll[1].clamp(min=1)).item(),
        }

    # -- resume ---------------------------------------------------------------------------
    start_step = base_samples = 0
    resumed = checkpoint.load_latest(engine, run_dir, rank, universal)
    if resumed is not None:
        start_step = resumed[0]
        # (a checkpoint from before the count was kept was saved on these ranks)
        base_samples = int(resumed[1].get("samples", start_step * t.grad_accum * per_step))
        if master:
            record_event(run_dir, Event.RESUMED_FROM, step=start_step)
            if spec.distributed.offload == "nvme":  # said where people look, not only in a README
                record_event(run_dir, Event.WARNING, detail=NVME_RESUME)
    elif master and attempt > 1:
        record_event(run_dir, Event.NO_CHECKPOINT, detail="starting fresh")
    if master:  # the views' start-up line moves on from "building the model"
        record_event(
            run_dir,
            Event.MODEL_READY,
            step=start_step,
            ranks=world,
            validation_first=start_step == 0 and has_val,
        )
        # fault injection: hold the start-up here, so a test sees the "first step" phase for sure
        time.sleep((fault("startup_delay_ms") or 0) / 1000)

    # prompts of the samples taken while training: given, or the start of the validation text
    prompts = list(t.sample_prompts)
    if t.sample_every and not prompts:
        src = val_blocks if has_val else train_blocks
        head = np.asarray(src.tokens[: t.sample_prompt_chars * 2], dtype=np.int64).tolist()
        prompts = [tok.decode(head)[: t.sample_prompt_chars]]

    # -- the loop -------------------------------------------------------------------------
    dev_name = torch.cuda.get_device_name(device) if cuda else None
    peak = peak_flops(dev_name)
    tokens_per_step = per_step * t.grad_accum * d.block_size
    stop_file = run_dir / "control" / "stop"
    if master:
        _watch_parent(run_dir, stop_file)
    proc = psutil.Process()
    loss_sum = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    stopped_at = None
    if start_step == 0 and has_val:  # where the curve starts
        ev = evaluate()
        if master:
            append_jsonl(run_dir / METRICS_FILE, {"step": 0, "time": time.time(), "attempt": attempt, **ev})
    engine.train()
    window_start = time.perf_counter()
    hang_at = fault("hang_at_step")
    raise_at = fault("raise_at_step")
    # fault injection: every step takes at least this long, so a test can catch a run mid-flight
    step_delay_s = (fault("step_delay_ms") or 0) / 1000
    gn_every = t.grad_norms_every
    grad_norm = None  # the last step's norm when clipped here (a tensor: read at log steps only)
    for step in range(start_step + 1, t.max_steps + 1):
        if hang_at == step and master:  # fault injection for the hang test: rank 0 stalls
            time.sleep(3600)
        if step_delay_s:
            time.sleep(step_delay_s)
        for micro in range(t.grad_accum):
            out = engine(**train_batch(step, micro))
            if raise_at == step and master:  # fault injection: a bug in the loss (user code)
                raise ZeroDivisionError("injected fault in the loss")
            engine.backward(out.loss)
            if gn_every and step % gn_every == 0 and micro == t.grad_accum - 1:
                norms = layer_grad_norms(engine.module, tp)  # every rank: ZeRO gathers collectively
                if master:
                    append_jsonl(run_dir / GRADS_FILE, {"step": step, "time": time.time(), "norms": norms})
            if own_clip and micro == t.grad_accum - 1:  # the boundary: gradients whole, averaged
                grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip, foreach=True)
            engine.step()
            loss_sum += out.loss.detach()  # no host sync here; read at log steps only
        window_steps += 1
        last = step == t.max_steps
        if step % t.log_every == 0 or last:
            flag = float(master and stop_file.exists())
            red = torch.stack([loss_sum / (window_steps * t.grad_accum), torch.tensor(flag, device=device)])
            dist.all_reduce(red)
            elapsed = time.perf_counter() - window_start
            tps = tokens_per_step * window_steps / elapsed
            peaks = _peaks_mb(torch, dist, device, world)
            gn = grad_norm if own_clip else engine.get_global_grad_norm()
            rec: dict[str, Any] = {
                "step": step,
                "time": time.time(),
                "attempt": attempt,
                "loss": red[0].item() / world,
                "lr": engine.get_lr()[0],
                "grad_norm": None if gn is None else float(gn),
                "tokens_per_s": tps,
                "step_time_s": elapsed / window_steps,
                "mfu": None if peak is None else fpt * tps / (peak * world),
                "peak_flops": peak,
                "mem_mb": (torch.cuda.max_memory_allocated(device) if cuda else proc.memory_info().rss)
                / 2**20,
                "mem_kind": "device_peak" if cuda else "rss",
                # every rank's peak so far (CUDA's allocator peak; the process's VmHWM on CPU)
                "mem_peak_mb_ranks": peaks,
                "mem_peak_mb": max(peaks),
                "tokens": samples_at(step) * d.block_size,
                "samples": samples_at(step),
            }
            if master:
                append_jsonl(run_dir / METRICS_FILE, rec)
                print(f"[jupyter-llm] step {step}/{t.max_steps}: {metrics_text(rec)}", flush=True)
            loss_sum.zero_()
            window_steps, window_start = 0, time.perf_counter()
            if red[1].item() > 0 and not last:
                stopped_at = step
        if has_val and ((t.eval_every and step % t.eval_every == 0) or last):
            ev = evaluate()
            if master:
                append_jsonl(
                    run_dir / METRICS_FILE, {"step": step, "time": time.time(), "attempt": attempt, **ev}
                )
                print(f"[jupyter-llm] step {step}/{t.max_steps} validation: {metrics_text(ev)}", flush=True)
            window_start = time.perf_counter()  # eval time is not training time
        if t.sample_every and (step % t.sample_every == 0 or step == 1 or last):
            texts = _samples(engine, tok, prompts, t.sample_tokens, d.block_size, device)  # every rank
            if master:
                for prompt, text in zip(prompts, texts, strict=True):
                    append_jsonl(run_dir / SAMPLES_FILE, {"step": step, "time": time.time(), "attempt": attempt,
                                                          "prompt": prompt, "output": text})  # fmt: skip
            window_start = time.perf_counter()  # nor is sampling
        if stopped_at or (t.save_every and step % t.save_every == 0 and not last):
            client = {"attempt": attempt, "samples": samples_at(step), "tensor_parallel": tp}
            checkpoint.save(engine, run_dir, step, rank, t.keep_checkpoints, client)
            window_start = time.perf_counter()
        if stopped_at:
            if master:
                record_event(run_dir, Event.STOPPED_AT, step=step)
                print(f"[jupyter-llm] stopped at step {step}/{t.max_steps}; checkpoint saved", flush=True)
            return

    # -- final export ---------------------------------------------------------------------
    # two sequences to check the export against, run as a whole validation batch with the KV
    # cache still off: the graph a compiled model already has (either change compiles anew)
    probe = batch(val_blocks if has_val else train_blocks, 0, False, _seed(spec.seed, -2, 0, 0))["input_ids"]
    engine.eval()
    with torch.no_grad():
        probe_logits = engine(input_ids=probe, attention_mask=None).logits[:2].float().cpu()  # as evaluate()
    probe = probe[:2]
    if use_cache is not None:  # the exported config keeps the model's own setting
        engine.module.config.use_cache = use_cache
    zero3 = spec.distributed.zero_stage == 3
    if zero3 and not spec.model.lora:
        # streamed: one gathered module at a time into safetensors shards, so the export of a
        # model larger than this machine's memory needs a shard's worth of it, not the model
        shards = ShardWriter(run_dir / ".final.tmp") if master else None
        gathered_state_dict(engine, master, shards.add if shards else None)
        if shards is not None:
            shards.close()
            _export_files(engine.module, tok, run_dir)
    else:
        if zero3:
            state = gathered_state_dict(engine, master)
        elif tp > 1:  # each rank holds a slice of every linear layer: rank 0 gathers them
            state = engine._consolidated_16bit_state_dict()
        else:
            state = None
        if master:
            module = engine.module
            if state is not None:
                # LoRA under ZeRO-3 or tensor parallel: this module holds shards; an unsharded
                # copy takes the whole state
                module = build_model(spec, tok)
                module.load_state_dict(state)
            _export(module, tok, run_dir)
    if master:
        torch.save({"input_ids": probe.cpu(), "logits": probe_logits}, run_dir / "export_check.pt")
        record_event(run_dir, Event.EXPORTED, path=str(run_dir / FINAL_DIR))
        print(f"[jupyter-llm] training completed: {t.max_steps} steps; the model is in {run_dir / FINAL_DIR}",
              flush=True)  # fmt: skip
    dist.barrier()


# glibc's malloc raises its mmap threshold (to at most 32 MiB) each time a large block is freed;
# blocks under it then come from a heap that fragments and is seldom returned. A rank fixes it:
FITTED_MMAP_THRESHOLD = 128 * 2**10  # bytes: ZeRO-3 or offload, a run fitted to memory
FAST_MMAP_THRESHOLD = 4 * 2**20  # bytes: every other run
# measured (docs/big-models.md): 128 KiB keeps an 85 M-parameter ZeRO-3 NVMe rank at 1.47 GB peak (4 MiB: 1.93,
# glibc's own: 2.24) but makes each activation above it a fresh, zeroed mmap: a small GPT's step
# took 160 ms at 128 KiB, 76 ms at 4 MiB
# Fixing the mmap threshold also fixes glibc's trim threshold at 128 KiB (glibc otherwise moves it
# to twice the mmap threshold): the heap's top is given back each time a step frees more than that
# and faulted in again, zeroed, at the next step. Every other run keeps up to this much free:
FAST_TRIM_THRESHOLD = 64 * 2**20  # bytes (measured, docs/benchmarks.md: a small GPT's rank took
# 12,000-22,000 page faults a second and 3 % of its CPU time in the kernel at 128 KiB; 8-33 at 64 MiB)


def worker_clip(ds_config: dict[str, Any]) -> float:
    """The max norm the worker clips to itself (0: DeepSpeed clips, or nothing does). Read from
    the config DeepSpeed gets (a spec's `deepspeed:` section may turn ZeRO or half precision on
    there): DeepSpeed clips per parameter exactly when neither ZeRO nor fp16/bf16 is on; under
    tensor parallelism (AutoTP) its clip knows the sliced layers, so it keeps it."""
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    zero = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    half = any((ds_config.get(k) or {}).get("enabled") for k in ("fp16", "bf16"))
    tp = int((ds_config.get("tensor_parallel") or {}).get("autotp_size", 1))
    return clip if zero == 0 and not half and tp == 1 else 0.0


def malloc_thresholds(spec: Any) -> int | None:
    """Fix glibc's mmap threshold for this process by the run's memory regime, and outside a
    run fitted to memory its trim threshold (FAST_TRIM_THRESHOLD, unless MALLOC_TRIM_THRESHOLD_
    sets it). Returns the mmap threshold set; None where the C library has no `mallopt` (not
    glibc) or MALLOC_MMAP_THRESHOLD_ in the environment set it."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    d = spec.distributed
    fitted = d.zero_stage == 3 or d.offload != "none"
    value = FITTED_MMAP_THRESHOLD if fitted else FAST_MMAP_THRESHOLD
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if mallopt(m_mmap_threshold, value) != 1:
        return None
    if not fitted and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(m_trim_threshold, FAST_TRIM_THRESHOLD)
    return value


def _saved_elsewhere(
    run_dir: Path, spec: Any, world: int, tp: int
) -> tuple[int, Path, dict[str, Any]] | None:
    """The newest checkpoint when it was saved on other ranks (or another TP degree) and must
    load through DeepSpeed's universal format, else None; CheckpointError where that cannot work."""
    from . import checkpoint

    found = checkpoint.newest(run_dir)
    if found is None:
        return None
    ranks, saved_tp = checkpoint.layout(found[2])
    if not ranks or (ranks, saved_tp) == (world, tp):
        return None
    d = spec.distributed
    if d.zero_stage == 0 and saved_tp == tp:
        return None  # no ZeRO: every rank's file holds the whole state, loadable on any ranks
    what = f"checkpoint {found[1].name} was saved on {ranks} rank(s), tensor_parallel {saved_tp}"
    if d.zero_stage == 0:
        raise checkpoint.CheckpointError(
            f"{what}: zero_stage 0 cannot change tensor_parallel; resume with {saved_tp}"
        )
    if d.offload == "nvme":
        raise checkpoint.CheckpointError(
            f"{what}: offload nvme resumes on the same ranks only; resume with {ranks}"
        )
    return found


NVME_RESUME = (
    "resumed under offload: nvme: weights, schedule and data position are restored, but DeepSpeed "
    "0.19.8 does not restore Adam's moments that lived in NVMe swap files (they restart from zero)"
)


def layer_grad_norms(module: Any, tp: int = 1) -> dict[str, float]:
    """L2 norm of the gradient per layer, read with DeepSpeed's ZeRO-safe accessor (under ZeRO
    1-3 it assembles partitioned gradients, so every rank must call it in the same order).
    Under tensor parallelism a split weight's squares are summed over its group; a replicated
    one (norms, a row-split layer's bias) counts once."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from .model import layer_key

    keys: list[str] = []
    sq = []  # per parameter: [split part, replicated part]
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param)
        if grad is not None:
            keys.append(layer_key(name))
            s = grad.float().pow(2).sum()
            split = tp > 1 and _tp_split(param)
            sq.append(torch.stack([s, torch.zeros_like(s)] if split else [torch.zeros_like(s), s]))
    if not sq:
        return {}
    parts = torch.stack(sq).cpu()
    if tp > 1:
        from deepspeed.utils import groups

        split = parts[:, 0].clone()
        dist.all_reduce(split, group=groups.get_tensor_model_parallel_group())
        parts[:, 0] = split
    out: dict[str, float] = {}
    for key, v in zip(keys, parts.sum(1).tolist(), strict=True):
        out[key] = out.get(key, 0.0) + v
    return {k: math.sqrt(v) for k, v in out.items()}


def _tp_split(param: Any) -> bool:
    """Whether AutoTP holds only a slice of `param` on this rank."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    meta = getattr(param, DS_AUTOTP_UC_META, None) or {}
    return bool(getattr(param, "tensor_model_parallel", False)) and not meta.get("replicated", False)


class ShardWriter:
    """Writes a state dict in safetensors shards of about `shard_bytes` as values arrive, and
    the index Transformers loads them by (model.safetensors.index.json)."""

    def __init__(self, folder: Path, shard_bytes: int = 256 * 2**20):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.limit = folder, shard_bytes
        self.pending: dict[str, Any] = {}
        self.size = self.total = 0
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, tensor: Any) -> None:
        self.pending[key] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.limit:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total += self.size
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        write_json_atomic(self.folder / "model.safetensors.index.json", index)


def gathered_state_dict(engine: Any, master: bool, sink: Any = None) -> dict[str, Any] | None:
    """The whole state dict of a ZeRO-3 engine's module on rank 0 (None elsewhere), gathered
    one module at a time (a collective: every rank calls it). As DeepSpeed's own
    `_zero3_consolidated_16bit_state_dict`, but every value is copied out: on a CPU device its
    `.cpu()` is no copy, and under NVMe offload a gathered parameter lives in a swap buffer
    that the next module reuses (the export then held one tensor many times). With `sink`,
    each value goes to `sink(key, tensor)` as it is gathered (tied copies once) instead."""
    import deepspeed

    opt = engine.optimizer
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()  # nothing in flight: every parameter partitioned
    state: dict[str, Any] = {}
    first_name: dict[int, str] = {}  # ds_id -> key: tied parameters stay one tensor

    def visit(module: Any, prefix: str) -> None:
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            if master:
                for name, p in module.named_parameters(recurse=False):
                    if p.ds_id in first_name:
                        if sink is None:
                            state[prefix + name] = state[first_name[p.ds_id]]
                        continue
                    first_name[p.ds_id] = prefix + name
                    (sink or state.__setitem__)(prefix + name, p.detach().clone())
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and name not in module._non_persistent_buffers_set:
                        (sink or state.__setitem__)(prefix + name, buf.detach().clone())
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(engine.module, "")
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()
    return state if master else None


def _export_files(module: Any, tok: Any, run_dir: Path) -> None:
    """final/ from the weights already in .final.tmp/: the config, generation config, tokenizer."""
    import shutil

    tmp, final = run_dir / ".final.tmp", run_dir / "final"
    module.config.save_pretrained(tmp)  # (again, where save_pretrained wrote it: the same file)
    if getattr(module, "generation_config", None) is not None and module.can_generate():
        module.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _export(module: Any, tok: Any, run_dir: Path) -> None:
    """save_pretrained into final/ via a temporary folder, so final/ is whole or absent.
    With LoRA: the merged model, and the adapter alone in final/adapter/."""
    import shutil

    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(module, "merge_and_unload"):  # LoRA: the adapter in adapter/, the merged model
        module.save_pretrained(tmp / "adapter")
        module = module.merge_and_unload()
    module.save_pretrained(tmp)
    _export_files(module, tok, run_dir)


def mlm_inputs(ids: Any, lens: Any, tok: Any, prob: float, mask_seed: int) -> dict[str, Any]:
    """A masked-LM batch from per-document chunks: [CLS] chunk [SEP] [PAD]..., BERT masking."""
    import torch

    lens = torch.as_tensor(lens)
    pos = torch.arange(ids.shape[1] + 2)
    full = torch.full((len(ids), ids.shape[1] + 2), tok.pad_token_id, dtype=ids.dtype)
    full[:, 1:-1] = torch.where(pos[None, :-2] < lens[:, None], ids, tok.pad_token_id)
    full[:, 0] = tok.cls_token_id
    full[torch.arange(len(ids)), lens + 1] = tok.sep_token_id
    attention = (pos[None, :] < (lens + 2)[:, None]).long()
    ids, labels = _mask_tokens(full, tok, prob, torch.Generator().manual_seed(mask_seed))
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def _mask_tokens(ids: Any, tok: Any, prob: float, gen: Any) -> tuple[Any, Any]:
    """BERT masking: of the chosen positions 80% [MASK], 10% random, 10% kept."""
    import torch

    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tok.all_special_ids:
        special |= ids == sid
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    labels[~chosen] = -100
    ids = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    ids[chosen & (roll < 0.8)] = tok.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand] = torch.randint(len(tok), ids.shape, generator=gen)[rand]
    return ids, labels


def _peaks_mb(torch: Any, dist: Any, device: Any, world: int) -> list[float]:
    """Each rank's peak memory so far in MiB: CUDA's allocator peak on a GPU, else VmHWM."""
    mine = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else vm_hwm_mb()
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(out, torch.tensor([mine], dtype=torch.float64, device=device))
    return [round(float(t.item()), 1) for t in out]


def vm_hwm_mb() -> float:
    """This process's resident-set high-water mark (VmHWM) in MiB; 0 where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _watch_parent(run_dir: Path, stop_file: Path, poll_s: float = 1.0) -> None:
    """Rank 0 watches the process supervising the job (folder.PARENT_ENV); once it is gone
    (SIGKILL, a crash) it requests a stop, so the ranks checkpoint at the next log step and
    exit instead of training on unsupervised. A later `resume` continues from there."""
    import threading

    from ..files import process_alive

    tag = os.environ.get(PARENT_ENV, "")
    pid, _, created = tag.partition(":")
    if not pid.isdigit():
        return

    def watch() -> None:
        while process_alive(int(pid), float(created) if created else None):
            time.sleep(poll_s)
        record_event(
            run_dir,
            Event.ORPHANED,
            parent_pid=int(pid),
            detail="the supervising process is gone: checkpoint and exit",
        )
        stop_file.parent.mkdir(exist_ok=True)
        stop_file.touch()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _samples(engine: Any, tok: Any, prompts: list[str], n_new: int, block: int, device: Any) -> list[str]:
    """Greedy continuations of `prompts` by the model being trained. Every rank runs the same
    forward passes (ZeRO-3 and tensor parallelism gather weights collectively), with the context
    cut to the last `block` tokens; the model's own cache is off while training."""
    import torch

    engine.eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id or 0]
            x = torch.tensor([ids], dtype=torch.long, device=device)
            for _ in range(n_new):
                nxt = engine(input_ids=x[:, -block:]).logits[:, -1].argmax(-1, keepdim=True)
                x = torch.cat([x, nxt], dim=1)
            outs.append(tok.decode(x[0, len(ids) :].tolist()))
    engine.train()
    return outs


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % 2**63
    return h


class Terminated(BaseException):
    """SIGTERM reached this rank (the launcher stops all ranks when one fails)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated by SIGTERM")


def redirect_output(path: Path) -> None:
    """Send this rank's stdout/stderr to its own log file (append across attempts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _record_rank(run_dir: Path, rank: int, local_rank: int, done: bool = False) -> None:
    import socket

    import psutil

    d = run_dir / "ranks"
    d.mkdir(exist_ok=True)
    me = psutil.Process()
    write_json_atomic(
        d / f"rank{rank}.json",
        {
            "rank": rank,
            "local_rank": local_rank,
            "pid": me.pid,
            "create_time": me.create_time(),
            "host": socket.gethostname(),
            "attempt": int(os.environ.get("JUPYTER_LLM_ATTEMPT", "1")),
            "done": done,  # True once it returned from the run without an error, about to exit
        },
    )


def record_failure(run_dir: Path, rank: int, e: BaseException) -> None:
    d = run_dir / "failures"
    d.mkdir(exist_ok=True)
    write_json_atomic(
        d / f"rank{rank}.json",
        {
            "rank": rank,
            "time": time.time(),
            "type": type(e).__name__,
            "message": str(e)[:2000],
            "attempt": int(os.environ.get("JUPYTER_LLM_ATTEMPT", "1")),
            "traceback": traceback.format_exc()[-4000:],
        },
    )
