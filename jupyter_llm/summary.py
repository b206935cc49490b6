"""Runs in words: progress, ETA and the few-line text summary, from the run folder alone.
The notebook's HTML (`display`) and the live widgets build on these."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .files import last_jsonl, read_json
from .folder import METRICS_FILE, SYSTEM_FILE, Event, RunFolder, State


def progress(run: RunFolder) -> dict[str, Any]:
    """Step, total, fraction, ETA (s) and the latest metrics, from the folder alone."""
    st = run.status()
    metrics = run.metrics()
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    try:
        total = run.spec.train.max_steps
    except Exception:
        total = None
    step = train[-1]["step"] if train else 0
    recent = [(m["step"], m["time"]) for m in train[-5:] if "time" in m]
    eta = None if State(st["state"]).terminal else eta_s(recent, total)
    return {
        "state": st["state"],
        "step": step,
        "total": total,
        "fraction": min(1.0, step / total) if total else 0.0,
        "eta_s": eta,
        "last": train[-1] if train else {},
        "last_val": val[-1] if val else {},
        "error": st.get("error"),
        "n_metrics": len(metrics),
    }


SUPERVISOR_PHASES = {
    "preflight": "checking the nodes",
    "data": "preparing data",
    "sync": "copying to the nodes",
}
DATA_PHASES = {"tokenizer": "the tokenizer", "tokenize": "tokenizing", "done": "packed"}


def startup(run: RunFolder) -> dict[str, str] | None:
    """What a run is doing before its first metric of this attempt: {"phase": "preparing data",
    "detail": "tokenizing 45%"}; None once it logs metrics, and for a finished run. Read from
    the status, the events and progress.json, as every view shows it (badge and line)."""
    st = run.status()
    state = st["state"]
    if State(state).terminal or state in ("stopping", "damaged") or st.get("job") == "prepare":
        return None
    events = run.events()
    launched = max((i for i, e in enumerate(events) if e.get("event") == Event.LAUNCHED), default=None)
    if state in ("starting", "resuming"):
        phase = SUPERVISOR_PHASES.get(st.get("phase") or "", "starting")
        return {"phase": phase, "detail": f"restart {st['restarts']}" if st.get("restarts") else ""}
    since = events[launched:] if launched is not None else []
    t0 = datetime.fromisoformat(since[0]["time"]).timestamp() if since and since[0].get("time") else 0.0
    try:  # a line written since this attempt's launch is its own (the earlier ranks are gone)
        if (run.path / METRICS_FILE).stat().st_mtime >= t0:
            return None
    except FileNotFoundError:
        pass
    if state == "created":
        return {"phase": "created", "detail": "waiting for its supervisor"}
    if not since:
        return {"phase": "starting", "detail": ""}
    seen = {e.get("event") for e in since}
    ranks = since[0].get("ranks") or st.get("world_size") or 1
    if Event.MODEL_READY in seen:
        ready = next(e for e in reversed(since) if e.get("event") == Event.MODEL_READY)
        return {
            "phase": "first step",
            "detail": "validating at step 0" if ready.get("validation_first") else "",
        }
    if Event.DATA_READY in seen:
        return {
            "phase": "building the model",
            "detail": f"the model and DeepSpeed's engine on {ranks} rank(s)",
        }
    prog = read_json(run.path / "progress.json") or {}
    if prog.get("time", 0) >= t0:
        total, done = prog.get("bytes_total") or 0, prog.get("bytes_done") or 0
        pct = f" {min(100, int(100 * done / total))}%" if total and prog.get("phase") == "tokenize" else ""
        return {"phase": "preparing data", "detail": DATA_PHASES.get(prog.get("phase", ""), "") + pct}
    return {"phase": "starting ranks", "detail": f"{ranks} rank(s) importing torch and DeepSpeed"}


def startup_text(s: dict[str, str]) -> str:
    return s["phase"] + (f": {s['detail']}" if s["detail"] else "")


METRIC_KEYS = [("loss", "loss"), ("val_loss", "val_loss"), ("val_ppl", "val_ppl"), ("lr", "lr"),
               ("grad_norm", "grad_norm"), ("tokens_per_s", "tokens/s")]  # fmt: skip


def metrics_text(m: dict[str, Any]) -> str:
    """A metrics line in words: loss=2.31 lr=0.001 tokens/s=1.006e+04 (the keys it has)."""
    return " ".join(f"{label}={m[k]:.4g}" for k, label in METRIC_KEYS if m.get(k) is not None)


def overview(run: RunFolder) -> list[tuple[str, str]]:
    """The run page's overview, as (label, value) rows: what ran, where, on what, how long, and
    how its spec differs from the defaults. From the status, the manifest and the spec."""
    st, man = run.status(), run.manifest() or {}
    rows = [("name", str(st.get("name") or run.id)), ("run id", run.id), ("state", st["state"])]
    for key, label in (("started_at", "started"), ("ended_at", "ended")):
        if st.get(key):
            rows.append((label, str(st[key])[:19].replace("T", " ")))
    if (took := duration_s(st)) is not None:
        rows.append(("duration", fmt_duration(took)))
    try:
        spec = run.spec
    except Exception:  # a damaged spec.yaml: the rest still shows
        spec = None
    world = st.get("world_size")
    if spec is not None:
        d = spec.distributed
        nodes = d.nodes if isinstance(d.nodes, str | int) else f"{len(d.nodes)} node(s)"
        rows.append(("hosts", str(man.get("host") or "?") if nodes == 1 else str(nodes)))
        tp = d.tensor_parallel
        layout = f"{world or '?'} rank(s)"
        if tp > 1 and world:
            layout += f" = {world // tp} data-parallel × {tp} tensor-parallel"
        rows.append(("layout", f"{layout}, ZeRO {d.zero_stage}, offload {d.offload}"))
    latest: dict[str, dict[str, Any]] = {}
    for ln in last_jsonl(run.path / SYSTEM_FILE):  # the newest sample of each node (the file's end)
        latest[str(ln.get("node"))] = ln
    for node, ln in latest.items():
        gpu = "".join(f"; GPU {g['index']}: {g['util_pct']:.0f} %, {g['mem_used_mb'] / 1024:.1f} of "
                      f"{g['mem_total_mb'] / 1024:.1f} GiB" for g in ln.get("gpus") or [])  # fmt: skip
        rows.append((f"system ({node})", f"CPU {ln['cpu_pct']:.0f} %, memory {ln['mem_used_mb'] / 1024:.1f} of "
                     f"{ln['mem_total_mb'] / 1024:.1f} GiB, the ranks {ln['ranks_rss_mb'] / 1024:.2f} GiB{gpu}"))  # fmt: skip
    if st.get("restarts"):
        rows.append(
            ("restarts", f"{st['restarts']} (last: {(st.get('last_restart') or {}).get('reason', '?')})")
        )
    if man.get("git_sha"):
        rows.append(("git", str(man["git_sha"])[:12]))
    if man.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in man["versions"].items())))
    for path, sha in (man.get("data_files") or {}).items():
        rows.append(("data", f"{Path(path).name} (sha256 {str(sha)[:12]})"))
    if spec is not None:
        changed = spec.model_dump(mode="json", exclude_defaults=True)
        flat: list[str] = []

        def walk(node: Any, prefix: str) -> None:
            for k, v in node.items():
                if isinstance(v, dict) and v and prefix + k not in ("model.config", "deepspeed"):
                    walk(v, f"{prefix}{k}.")
                elif prefix + k not in ("name", "data.train"):
                    flat.append(f"{prefix}{k}={json.dumps(v)}")

        walk(changed, "")
        rows.append(("spec (not default)", ", ".join(flat) or "all defaults"))
    return rows


def eta_s(recent: Sequence[tuple[int, float]], total: int | None) -> float | None:
    """Seconds to `total` steps at the pace of `recent` (step, time) points, oldest first: the
    one ETA of the text summary, the dashboard and the terminal."""
    if not total or len(recent) < 2:
        return None
    (s0, t0), (s1, t1) = recent[0], recent[-1]
    return (t1 - t0) / (s1 - s0) * max(0, total - s1) if s1 > s0 else None


def duration_s(st: dict[str, Any]) -> float | None:
    """Seconds from start to end (to now while it runs); None before it started."""
    start, end = st.get("started_at"), st.get("ended_at")
    if not start:
        return None
    t1 = datetime.fromisoformat(end).timestamp() if end else time.time()
    return t1 - datetime.fromisoformat(start).timestamp()


def fmt_duration(s: float | None) -> str:
    """Seconds as 1m05s or 2h03m; empty for None."""
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def prepare_progress(run: RunFolder) -> dict[str, Any]:
    """A prepare job's state, progress (input bytes read) and, once ready, its data stats."""
    st = run.status()
    prog = read_json(run.path / "progress.json") or {}
    ready = next((e for e in reversed(run.events()) if e.get("event") == Event.DATA_READY), None)
    index = read_json(Path(ready["path"]) / "index.json") if ready else None
    total = prog.get("bytes_total") or 0
    frac = 1.0 if ready else (min(1.0, prog.get("bytes_done", 0) / total) if total else 0.0)
    return {"state": st["state"], "phase": prog.get("phase", "starting"), "fraction": frac,
            "tokens": prog.get("tokens", 0), "ready": ready, "index": index, "error": st.get("error")}  # fmt: skip


def stats_rows(ready: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [("cached", ready["cached"]), ("train tokens", ready["tokens"]["train"]["tokens"]),
            ("validation tokens", ready["tokens"]["val"]["tokens"])]  # fmt: skip
    for k in ("documents_read", "documents", "dropped_length", "duplicates", "dropped_transform"):
        if k in ready:
            rows.append((k.replace("_", " "), ready[k]))
    return rows


def prepare_text(run: RunFolder) -> str:
    p = prepare_progress(run)
    text = f"{run.id} (prepare): {p['state']}, {p['phase']} {int(100 * p['fraction'])}%"
    if p["ready"]:
        text += "; " + ", ".join(f"{k} {v}" for k, v in stats_rows(p["ready"]))
    if p["error"]:
        text += f"\n  error: {p['error']}"
    return text + f"\n  folder: {run.path}"


def run_text(run: RunFolder) -> str:
    if run.status().get("job") == "prepare":
        return prepare_text(run)
    p = progress(run)
    parts = [f"{run.id}: {p['state']}, step {p['step']}/{p['total'] or '?'}"]
    if p["last"].get("loss") is not None:
        parts.append(f"loss {p['last']['loss']:.4f}")
    if p["last_val"].get("val_loss") is not None:
        parts.append(f"val_loss {p['last_val']['val_loss']:.4f}")
    if p["eta_s"] is not None:
        parts.append(f"ETA {fmt_duration(p['eta_s'])}")
    text = ", ".join(parts)
    if p["error"]:
        text += f"\n  error: {p['error']}"
    text += restarts_text(run.status())
    return text + f"\n  folder: {run.path}"


def restarts_text(st: dict[str, Any]) -> str:
    """ "restarts: N (last: why)" for a run that restarted itself; empty otherwise."""
    if not st.get("restarts"):
        return ""
    last = st.get("last_restart") or {}
    return f"\n  restarts: {st['restarts']} automatic (last: {last.get('reason', '?')})"


def eval_numbers(res: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json, flat: perplexity, eval_loss, masked_accuracy, bleu, rouge*."""
    out: dict[str, float] = {}
    p, m = res.get("perplexity") or {}, res.get("masked") or {}
    if p.get("ppl") is not None:
        out["perplexity"], out["eval_loss"] = float(p["ppl"]), float(p["loss"])
    if m.get("accuracy") is not None:
        out["masked_accuracy"] = float(m["accuracy"])
    for k in ("bleu", "rouge1", "rouge2", "rougeL"):
        if res.get(k) is not None:
            out[k] = float(res[k])
    return out
