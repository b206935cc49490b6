"""The prepared-data cache: `tokenize_to_files` writes a folder of token files and its index,
`prepare` keeps it under a key hashed from what it depends on (`cache_key`), and
`data_stage` is a run's whole data step."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...folder import Event, record_event
from ...hashing import content_sha256
from ...spec import Spec
from .cleaning import Transform, documents
from .packing import encode_to, move_tail, split_doc_ends
from .pairs import encode_examples_to, supervised
from .sources import DataError, Meter, size
from .tokenizer import batch_encoder, build_tokenizer, char_encoder

FORMAT = 3  # bump when the layout of prepared data changes: old cache entries stop matching


def cache_key(spec: Spec, tok: Any, transform: Transform | None = None) -> str:
    """Hash of what the prepared data depends on: input contents (not paths), cleaning and
    split parameters, the task, and the tokenizer's full definition."""
    h = hashlib.sha256()
    d = spec.data
    params = {"format": FORMAT, "task": spec.model.task, "text_field": d.text_field,
              "val_fraction": None if d.validation else d.val_fraction, "clean": d.clean.model_dump(),
              "data_format": d.format, "fields": [d.prompt_field, d.response_field, d.messages_field] if d.format != "text" else None}  # fmt: skip
    h.update(json.dumps(params, sort_keys=True).encode())
    for group in (d.train, d.validation or []):
        h.update(b"\x00group")
        for f in group:
            h.update(content_sha256(f).encode())
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(f"transform:{transform.digest if transform else None}".encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True).encode())
    h.update(f"chat_template:{getattr(tok, 'chat_template', None)}".encode())
    return h.hexdigest()[:32]


def prepare(
    spec: Spec,
    tok: Any,
    cache_root: Path,
    transform: Transform | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, bool]:
    """The prepared-data folder for (spec, tok), and whether it came from the cache.

    Built under a temporary dot-name and renamed into place: a folder named by its key is
    always complete. Leftovers of killed writers (their pid gone) are removed.
    """
    cache_root.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec, tok, transform)
    final = cache_root / key
    if (final / "index.json").is_file():
        return final, True
    _remove_stale(cache_root)
    tmp = cache_root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tokenize_to_files(spec, tok, tmp, transform, progress)
        try:
            os.rename(tmp, final)
        except OSError:  # another writer finished first: theirs is identical
            if not (final / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def data_stage(run_dir: Path, spec: Spec) -> dict[str, Any]:
    """A run's data step: its tokenizer (kept in the run folder), prepared data from the
    cache (or made now), `data.json` naming the folder, and a `data_ready` event; the index."""
    from transformers import AutoTokenizer

    from ...files import write_json_atomic

    tok_dir = run_dir / "tokenizer"
    transform = Transform.load(run_dir)
    files = [Path(f) for f in [*spec.data.train, *(spec.data.validation or [])]]
    total = sum(size(f) for f in files)
    last = [0.0]

    def report(phase: str, tokens: int = 0, force: bool = False) -> None:
        now = time.time()
        if force or now - last[0] >= 1.0:  # at most once a second
            last[0] = now
            write_json_atomic(run_dir / "progress.json", {"phase": phase, "bytes_done": Meter.bytes_read,
                              "bytes_total": total, "tokens": tokens, "time": now})  # fmt: skip

    Meter.bytes_read = 0
    report("tokenizer", force=True)
    tok = (
        AutoTokenizer.from_pretrained(tok_dir)
        if tok_dir.is_dir()
        else build_tokenizer(spec, tok_dir, transform)
    )
    cache_root = Path(os.environ.get("JUPYTER_LLM_DATA_CACHE") or run_dir.parent / ".cache" / "data")
    Meter.bytes_read = 0  # training a tokenizer read the data once already
    data_dir, hit = prepare(spec, tok, cache_root, transform, progress=lambda n: report("tokenize", n))
    index: dict[str, Any] = json.loads((data_dir / "index.json").read_text())
    report("done", sum(v["tokens"] for v in index["splits"].values()), force=True)
    write_json_atomic(run_dir / "data.json", {"path": str(data_dir), "cached": hit})
    record_event(
        run_dir, Event.DATA_READY, path=str(data_dir), cached=hit, tokens=index["splits"], **index["stats"]
    )
    return index


def _remove_stale(cache_root: Path) -> None:
    import psutil

    for p in cache_root.glob(".*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def tokenize_to_files(
    spec: Spec,
    tok: Any,
    out_dir: Path,
    transform: Transform | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize train (and validation) text into flat token files; returns the index.

    Streams: documents are read, cleaned and tokenized in batches and appended to the token
    file, so memory stays bounded whatever the corpus size. Without validation files the
    last `val_fraction` of the training tokens becomes the validation split.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    d = spec.data
    sep = tok.eos_token_id if spec.model.task == "causal-lm" else tok.sep_token_id
    encode = char_encoder(tok) if spec.tokenizer.train and spec.tokenizer.train.kind == "char" else None
    encode = encode or batch_encoder(tok)
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    stats: Counter[str] = Counter()
    t0 = time.perf_counter()
    train_bin, val_bin = out_dir / "train.bin", out_dir / "val.bin"
    pairs = d.format != "text"
    per_doc = spec.model.task == "masked-lm"  # masked LMs train on blocks that never cross documents
    if pairs and transform is not None:
        raise DataError(
            f"a data transform applies to text documents; data.format {d.format} does not take one"
        )

    def write(files: list[str], path: Path, before: int = 0) -> int:
        report = (lambda n: progress(before + n)) if progress else None
        if pairs:
            return encode_examples_to(path, supervised(spec, files, stats, tok), encode, sep, dtype, report)
        return encode_to(path, documents(spec, files, stats, transform), encode, sep, dtype, report, per_doc)

    n_train = write(d.train, train_bin)
    if _fault_stall():  # half written: train.bin exists, val.bin and index.json do not
        time.sleep(3600)
    if d.validation:
        n_val = write(d.validation, val_bin, n_train)
    else:
        n_val = int(n_train * d.val_fraction)
        n_train -= n_val
        move_tail(train_bin, val_bin, n_train * np.dtype(dtype).itemsize)
        if pairs:
            move_tail(train_bin.with_suffix(".mask"), val_bin.with_suffix(".mask"), n_train)
        if per_doc:
            split_doc_ends(train_bin.with_suffix(".docs"), val_bin.with_suffix(".docs"), n_train)
    if not n_train:
        raise DataError(f"no training text left in {', '.join(d.train)} after cleaning: {dict(stats)}")
    index = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": len(tok),
        "splits": {"train": {"tokens": n_train}, "val": {"tokens": n_val}},
        "loss_mask": pairs,  # train.mask/val.mask: 1 where the loss counts (response tokens)
        "stats": {k: v for k, v in sorted(stats.items()) if not k.startswith("len_")},
        "length_histogram": {
            k[4:]: v for k, v in sorted(stats.items(), key=lambda kv: len(kv[0])) if k.startswith("len_")
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))  # written last: marks the folder whole
    return index


def _fault_stall() -> bool:
    """Fault injection for the interrupted-preparation test: JUPYTER_LLM_FAULT=stall_prepare."""
    return os.environ.get("JUPYTER_LLM_FAULT") == "stall_prepare"
