"""tiktoken's engine for byte-level BPE tokenizers: the same tokens as `tokenizers`, or not used."""

from __future__ import annotations

import json
import random
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import CORPUS
from jupyter_llm.spec import Spec
from jupyter_llm.train import bpe
from jupyter_llm.train.data import build_tokenizer
from jupyter_llm.train.data.tokenizer import batch_encoder


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level BPE trained on Tiny Shakespeare, as the prepare step trains one."""
    spec = Spec.from_dict(
        {"tokenizer": {"train": {"kind": "bpe", "vocab_size": 1000}}, "data": {"train": str(CORPUS)}}
    )
    return build_tokenizer(spec, tmp_path_factory.mktemp("tok"))


def reference(tok: Any, pieces: list[str]) -> list[list[int]]:
    return [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]


def _texts(seed: int, n: int) -> list[str]:
    """Text that exercises the pre-tokenizer's classes: letters, marks and digits of many scripts,
    every kind of space, contractions, punctuation, symbols, emoji, controls, special tokens."""
    rng = random.Random(seed)
    assigned = [c for c in range(sys.maxunicode + 1)
                if unicodedata.category(chr(c)) not in ("Cs", "Cn", "Co")]  # fmt: skip
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2003", "\u2028",
              "\u202f", "\u3000", "\u200b", "\ufeff"]  # fmt: skip
    words = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "’s", "don't", "I'LL", "it's", "123", "4,5",
             "١٢٣", "²", "½", "Ⅻ", "ǅ", "é", "e\u0301", "क्षि", "한국어", "日本語", "🙂🏽", "👩‍👩‍👧", "<|endoftext|>",
             "<unk>", "<|endoftext", "O'Neil", "--", "...", "$5", "x\x00y", "\x7f", "Ω", "ﬁ", "İ"]  # fmt: skip
    prose = CORPUS.read_text()[:20000].split()
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            parts.append(rng.choice(prose) if r < 0.4 else rng.choice(words) if r < 0.6
                         else chr(rng.choice(assigned)) if r < 0.8 else rng.choice(spaces))  # fmt: skip
        out.append("".join(parts))
    return out


def test_tiktoken_gives_the_tokenizers_tokens(tok: Any) -> None:
    fast = bpe.encoder(tok, threads=2)
    assert fast is not None, "a trained byte-level BPE is convertible"
    texts = [*_texts(0, 4000), "", " ", "  \n\n ", "a" * 20000, "<|endoftext|>" * 3]
    got = fast(texts)
    want = reference(tok, texts)
    bad = [(t, g.tolist(), w) for t, g, w in zip(texts, got, want, strict=True) if g.tolist() != w]
    assert not bad, bad[:3]
    assert all(g.dtype == np.uint32 for g in got)
    assert sum(map(len, want)) > 100_000  # the fuzz is not trivially short


def test_a_piece_containing_the_joiner_is_still_exact(tok: Any) -> None:
    fast = bpe.encoder(tok, threads=1)
    assert fast is not None
    texts = ["before", f"a{bpe.JOINER}b", "", "after<|endoftext|>"]
    assert [g.tolist() for g in fast(texts)] == reference(tok, texts)


def test_only_plain_byte_level_bpe_is_converted(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers import Tokenizer

    desc = json.loads(tok.backend_tokenizer.to_str())
    assert bpe.convertible(desc) is None and bpe.ranks(desc) is not None

    def variant(**changes: Any) -> Any:
        d = json.loads(json.dumps(desc))
        for path, value in changes.items():
            *keys, last = path.split("__")
            node = d
            for k in keys:
                node = node[k]
            node[last] = value
        return Tokenizer.from_str(json.dumps(d))

    for changed in [
        variant(pre_tokenizer__add_prefix_space=True),
        variant(pre_tokenizer__use_regex=False),
        variant(normalizer={"type": "NFC"}),
        variant(model__dropout=0.1),
        variant(model__byte_fallback=True),
    ]:
        assert bpe.encoder(changed) is None
    # ids that do not follow the merge order (two merged tokens swapped) cannot be ranks
    vocab = dict(desc["model"]["vocab"])
    first, second = (
        "".join(m) if isinstance(m, list) else m.replace(" ", "") for m in desc["model"]["merges"][:2]
    )
    vocab[first], vocab[second] = vocab[second], vocab[first]
    assert bpe.encoder(variant(model__vocab=vocab)) is None
    wordpiece = build_tokenizer(
        Spec.from_dict({"model": {"task": "masked-lm"}, "tokenizer": {"train": {"kind": "wordpiece", "vocab_size": 200}},
                        "data": {"train": str(CORPUS)}}), tmp_path / "wp")  # fmt: skip
    assert bpe.encoder(wordpiece) is None
    monkeypatch.setenv("JUPYTER_LLM_TIKTOKEN", "0")
    assert bpe.encoder(tok) is None


def test_preparation_encodes_through_tiktoken(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prepare step's own path (tokenize_to_files) uses the tiktoken encoder for a trained
    BPE, every batch of it, and packs exactly the reference tokens."""
    from jupyter_llm.train.data import tokenize_to_files

    calls: list[int] = []
    real = bpe.encoder

    def spying(t: Any, threads: int | None = None) -> Any:
        fast = real(t, threads)
        assert fast is not None
        return lambda pieces: calls.append(len(pieces)) or fast(pieces)

    monkeypatch.setattr("jupyter_llm.train.data.tokenizer.bpe.encoder", spying)
    docs = _texts(7, 300)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d.strip()))
    kept = [d for d in docs if d.strip()]
    spec = Spec.from_dict(
        {
            "tokenizer": {"path": str(tmp_path)},
            "data": {"train": str(src), "val_fraction": 0},
            "train": {"eval_every": 0},
        }
    )
    index = tokenize_to_files(spec, tok, tmp_path / "out")
    assert sum(calls) == len(kept)
    packed = np.fromfile(tmp_path / "out" / "train.bin", dtype=index["dtype"]).tolist()
    assert packed == [t for ids in reference(tok, kept) for t in [*ids, tok.eos_token_id]]


def test_a_difference_falls_back_to_the_tokenizer(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["To be, or not to be", "that is the question"]
    wrong = lambda pieces: [np.zeros(1, np.uint32) for _ in pieces]  # noqa: E731
    monkeypatch.setenv("JUPYTER_LLM_TIKTOKEN", "0")
    right = batch_encoder(tok)  # `tokenizers` alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = bpe.checked(wrong, right)
        assert [g.tolist() for g in checked(texts)] == reference(tok, texts)
        assert [g.tolist() for g in checked(texts[::-1])] == reference(tok, texts[::-1])
    assert any("differ" in str(w.message) for w in caught)
