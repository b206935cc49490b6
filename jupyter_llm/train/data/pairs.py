"""Supervised examples: prompt/response pairs and chats (rendered by the chat template, split
into prompt and assistant segments), cleaned, and encoded with a loss mask beside the tokens."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...spec import Spec
from .cleaning import Cleaner
from .sources import DataError, Meter

Segments = list[tuple[str, bool]]  # an example's text in order; True where the loss counts


def supervised(spec: Spec, files: list[str], stats: Counter[str], tok: Any = None) -> Iterator[Segments]:
    """Examples of `data.format` pairs (prompt, response) or chat (messages rendered by the
    chat template; assistant turns count) from JSONL lines, cleaned as `data.clean` asks
    (filters and de-duplication see the example as a whole)."""
    d = spec.data
    render = _chat_renderer(spec, tok) if d.format == "chat" else None
    cleaner = Cleaner(d.clean, stats)
    for name in files:
        with open(name, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                Meter.bytes_read += len(raw)
                try:
                    obj = json.loads(raw.decode("utf-8")) if raw.strip() else None
                except UnicodeDecodeError:
                    raise DataError(f"{name}:{lineno}: not UTF-8 text") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}:{lineno}: not valid JSON ({e.msg})") from None
                if obj is None:
                    continue
                where = f"{name}:{lineno}"
                segs = (
                    _chat_segments(obj, render, d.messages_field, where) if render else _pair(obj, d, where)
                )
                stats["documents_read"] += 1
                segs = [(cleaner.text(t), w) for t, w in segs]
                if not any(t for t, w in segs if w):  # nothing to learn from
                    stats["dropped_length"] += 1
                    continue
                n = sum(len(t) for t, _ in segs)
                digest = (
                    hashlib.blake2b(json.dumps(segs).encode(), digest_size=16).digest()
                    if d.clean.dedup
                    else b""
                )
                if not cleaner.keep(n, digest):
                    continue
                cleaner.kept(n)
                yield segs


def _pair(obj: Any, d: Any, where: str) -> Segments:
    for key, field in ((d.prompt_field, "prompt_field"), (d.response_field, "response_field")):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            raise DataError(f"{where}: no string field {key!r} (data.{field})")
    return [(obj[d.prompt_field], False), (obj[d.response_field], True)]


def _chat_renderer(spec: Spec, tok: Any) -> Callable[[list[dict[str, str]], bool], str]:
    """messages -> text by the chat template: the tokenizer's (it carries the spec's
    `tokenizer.chat_template` once built), or the spec's alone while training a tokenizer."""
    if tok is not None:
        if not getattr(tok, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template: set tokenizer.chat_template for data.format chat"
            )
        return lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        spec.tokenizer.chat_template or ""
    )
    return lambda msgs, gen: template.render(messages=msgs, add_generation_prompt=gen)


def _chat_segments(
    obj: Any, render: Callable[[list[dict[str, str]], bool], str], field: str, where: str
) -> Segments:
    """Split a rendered conversation into prompt and assistant segments by rendering its
    prefixes: before assistant turn i = render(messages[:i], generation prompt); through it
    = render(messages[:i + 1])."""
    msgs = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    ):
        raise DataError(
            f"{where}: no list of {{role, content}} messages in field {field!r} (data.messages_field)"
        )
    segs: Segments = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, through = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        segs += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    full = render(msgs, False)
    if len(full) > len(done):
        segs.append((full[len(done) :], False))
    return segs


def encode_examples_to(
    path: Path,
    examples: Iterator[Segments],
    encode: Any,
    sep: int,
    dtype: Any,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Each example's segments + EOS into `path`, and a uint8 loss mask beside it (`path`
    with suffix .mask): 1 on segments that count (responses) and the EOS, 0 elsewhere."""
    total = 0
    with open(path, "wb") as out, open(path.with_suffix(".mask"), "wb") as mask_out:
        for chunk in _batched(examples, 1024):
            encoded = iter(encode([t for segs in chunk for t, _ in segs]))
            ids: list[np.ndarray] = []
            mask: list[np.ndarray] = []
            for segs in chunk:
                for _, counts in segs:
                    part = next(encoded)
                    ids.append(part)
                    mask.append(np.full(len(part), counts, np.uint8))
                ids.append(np.asarray([sep]))
                mask.append(np.ones(1, np.uint8))
            flat = np.concatenate(ids).astype(dtype)
            flat.tofile(out)
            np.concatenate(mask).tofile(mask_out)
            total += len(flat)
            if progress:
                progress(total)
    return total


def _batched(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
