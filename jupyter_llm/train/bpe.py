"""Byte-level BPE tokenizers encoded by tiktoken's engine: the same tokens, several times faster.

A GPT-2-style tokenizer (`tokenizers` BPE model, ByteLevel pre-tokenizer with its regex, no
normaliser) is fully described by its vocabulary and merge list. When every merged token's
id grows with its merge's position, the ids are tiktoken's ranks and tiktoken's byte-pair
merging by rank gives the same tokens as the merge list. `encoder` checks that description
field by field and gives None for anything else (WordPiece, prefix spaces, byte fallback,
dropout, a normaliser, ...), which then goes to `tokenizers` itself.

Pieces are joined with a private separator (a special token that only this encoding has),
encoded in one call per thread (tiktoken releases the GIL) and cut at the separators. A
piece that itself contains the separator's text makes the count wrong; that chunk is then
encoded piece by piece. The first batch is also encoded by `tokenizers` and compared; any
difference switches this preparation back to `tokenizers` with a warning.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# the pre-tokenizer regex of `tokenizers`' ByteLevel (use_regex=True), in tiktoken's syntax
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
JOINER = "\x00\x01jupyter-llm-piece\x01\x00"

Encode = Callable[[list[str]], list[np.ndarray]]


def byte_decoder() -> dict[str, int]:
    """ByteLevel's printable character for each byte, inverted: character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    byte_order = printable + [b for b in range(256) if b not in printable]
    return {chr(c): b for b, c in zip(byte_order, chars, strict=True)}


def convertible(desc: dict[str, Any]) -> str | None:
    """Why a tokenizer.json description is not a plain byte-level BPE (None: it is)."""
    model, pre = desc.get("model") or {}, desc.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')}"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE {key}"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "BPE byte_fallback/ignore_merges"
    if desc.get("normalizer"):
        return "a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return f"pre-tokenizer {pre}"
    for t in desc.get("added_tokens") or []:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t['content']!r} strips or matches single words"
    return None


def ranks(desc: dict[str, Any]) -> dict[bytes, int] | None:
    """Token bytes -> rank (the id) without the added tokens, or None when a token is not
    made by exactly one merge or the ids do not follow the merge order."""
    added = {t["content"] for t in desc.get("added_tokens") or []}
    vocab = {t: i for t, i in desc["model"]["vocab"].items() if t not in added}
    to_byte = byte_decoder()
    if any(ch not in to_byte for t in vocab for ch in t) or sum(len(t) == 1 for t in vocab) != 256:
        return None
    merges = desc["model"]["merges"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "", 1) for m in merges]
    ids = [vocab.get(t, -1) for t in merged]
    if set(merged) != {t for t in vocab if len(t) > 1} or len(set(merged)) != len(merged):
        return None
    if any(a >= b for a, b in itertools.pairwise(ids)):
        return None
    return {bytes(to_byte[ch] for ch in t): i for t, i in vocab.items()}


def encoder(tok: Any, threads: int | None = None) -> Encode | None:
    """An `encode(pieces) -> [ids per piece]` with tiktoken for `tok`, or None when it does not apply."""
    if os.environ.get("JUPYTER_LLM_TIKTOKEN") == "0":
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    backend = getattr(tok, "backend_tokenizer", tok)
    desc = json.loads(backend.to_str())
    if convertible(desc) is not None:
        return None
    mergeable = ranks(desc)
    if mergeable is None:
        return None
    specials = {t["content"]: t["id"] for t in desc.get("added_tokens") or []}
    joiner_id = max([*mergeable.values(), *specials.values()]) + 1
    enc = tiktoken.Encoding(
        "jupyter-llm-bytelevel",
        pat_str=BYTE_LEVEL_PATTERN,
        mergeable_ranks=mergeable,
        special_tokens={**specials, JOINER: joiner_id},
    )
    allowed = set(specials)
    workers = threads or len(os.sched_getaffinity(0))
    pool = ThreadPoolExecutor(workers)

    def one(text: str) -> np.ndarray:
        return enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())

    def chunk(pieces: list[str]) -> list[np.ndarray]:
        ids = enc.encode_to_numpy(JOINER.join(pieces) + JOINER, allowed_special=allowed | {JOINER})
        cuts = np.flatnonzero(ids == joiner_id)
        if len(cuts) != len(pieces):  # a piece contains the joiner's text
            return [one(p) for p in pieces]
        starts = np.concatenate([[0], cuts[:-1] + 1])
        return [ids[a:b] for a, b in zip(starts, cuts, strict=True)]

    def encode(pieces: list[str]) -> list[np.ndarray]:
        n = -(-len(pieces) // workers) or 1
        parts = pool.map(chunk, [pieces[i : i + n] for i in range(0, len(pieces), n)])
        return [ids for part in parts for ids in part]

    return encode


def checked(fast: Encode, reference: Encode, sample: int = 256) -> Encode:
    """`fast`, compared with `reference` on the first call's first `sample` pieces; on any
    difference that call and the rest go to `reference` (with a warning)."""
    use, first = fast, True

    def encode(pieces: list[str]) -> list[np.ndarray]:
        nonlocal use, first
        out = use(pieces)
        if first:
            first = False
            if not all(np.array_equal(a, b) for a, b in zip(out, reference(pieces[:sample]), strict=False)):
                warnings.warn(
                    "tiktoken's tokens differ from the tokenizer's: using the tokenizer", stacklevel=2
                )
                use = reference
                out = reference(pieces)
        return out

    return encode
