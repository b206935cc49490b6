"""Worker-side data: read documents, build or train the tokenizer, pack token blocks.

A plain in-process version: rank 0 tokenizes once into `data/*.bin` (uint16 when the
vocabulary fits) and every rank memory-maps the result. Which samples a rank sees at a
given step is a pure function of (seed, step), so resuming needs only the step.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import Spec

CAUSAL_SPECIALS = {"eos_token": "<|endoftext|>", "unk_token": "<unk>"}
MASKED_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


class DataError(ValueError):
    """Bad training data: the message names the file and line."""


def read_documents(files: list[str], text_field: str) -> Iterator[str]:
    """Documents from .txt/.md (one per file), .jsonl (one per line) and .csv (one per row)."""
    for name in files:
        path = Path(name)
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise DataError(f"{path}:{lineno}: no string field {text_field!r} (data.text_field)")
                    yield obj[text_field]
        elif path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if text_field not in (reader.fieldnames or []):
                    raise DataError(
                        f"{path}: no column {text_field!r} (data.text_field); columns: {reader.fieldnames}"
                    )
                for row in reader:
                    yield row[text_field]
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def build_tokenizer(spec: Spec, out_dir: Path) -> Any:
    """Load the tokenizer the spec names, or train one on the training text; save to out_dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = spec.tokenizer_source()
    if source is not None:
        tok = AutoTokenizer.from_pretrained(source)
    else:
        train = spec.tokenizer.train
        kind, vocab = (train.kind, train.vocab_size) if train else ("char", 0)
        specials = MASKED_SPECIALS if spec.model.task == "masked-lm" else CAUSAL_SPECIALS
        raw = _train_tokenizer(kind, vocab, list(specials.values()), spec)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
        if spec.model.task == "causal-lm":
            tok.bos_token = tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.model_max_length = 2**62  # we pack long streams ourselves; silence length warnings
    tok.save_pretrained(out_dir)
    return tok


def _train_tokenizer(kind: str, vocab_size: int, specials: list[str], spec: Spec) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    unk = "[UNK]" if "[UNK]" in specials else "<unk>"
    if kind == "char":
        # the vocabulary is the set of characters: collected directly, far faster than a
        # trainer that sees every character as a pre-token
        chars: set[str] = set()
        for doc in read_documents(spec.data.train, spec.data.text_field):
            chars.update(doc)
        vocab = {t: i for i, t in enumerate([*specials, *sorted(chars - set(specials))])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok
    trainer: Any
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    docs = read_documents(spec.data.train, spec.data.text_field)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def tokenize_to_files(spec: Spec, tok: Any, out_dir: Path) -> dict[str, Any]:
    """Tokenize train (and validation) text into flat token files; returns the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    d = spec.data
    sep = tok.eos_token_id if spec.model.task == "causal-lm" else tok.sep_token_id
    encode = _char_encoder(tok) if spec.tokenizer.train and spec.tokenizer.train.kind == "char" else None
    train = _encode(read_documents(d.train, d.text_field), tok, sep, encode)
    if d.validation:
        val = _encode(read_documents(d.validation, d.text_field), tok, sep, encode)
    else:
        n_val = int(len(train) * d.val_fraction)
        train, val = train[: len(train) - n_val], train[len(train) - n_val :]
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    splits: dict[str, dict[str, int]] = {}
    for split, ids in (("train", train), ("val", val)):
        np.asarray(ids, dtype=dtype).tofile(out_dir / f"{split}.bin")
        splits[split] = {"tokens": len(ids)}
    index = {"dtype": np.dtype(dtype).name, "vocab_size": len(tok), "splits": splits}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return index


def _char_encoder(tok: Any) -> Any:
    """Vectorised encoding for a character-level vocabulary: code point -> id by lookup.

    Gives exactly what the tokenizer gives (tested), without a pre-token per character.
    """
    vocab = {t: i for t, i in tok.get_vocab().items() if len(t) == 1}
    cps = np.array(sorted(ord(c) for c in vocab), dtype=np.uint32)
    ids = np.array([vocab[chr(c)] for c in cps], dtype=np.int64)
    unk = tok.unk_token_id

    def encode(docs: list[str]) -> list[np.ndarray]:
        out = []
        for doc in docs:
            a = np.frombuffer(doc.encode("utf-32-le"), dtype=np.uint32)
            idx = np.minimum(np.searchsorted(cps, a), len(cps) - 1)
            out.append(np.where(cps[idx] == a, ids[idx], unk))
        return out

    return encode


def _encode(
    docs: Iterator[str], tok: Any, sep: int | None, encode: Any = None, batch: int = 256
) -> np.ndarray:
    parts: list[np.ndarray] = []
    buf: list[str] = []
    tail = np.asarray([sep] if sep is not None else [], dtype=np.int64)

    def flush() -> None:
        encoded = encode(buf) if encode else tok(buf, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            parts.append(np.concatenate([np.asarray(ids, dtype=np.int64), tail]))
        buf.clear()

    for doc in docs:
        if doc:
            buf.append(doc)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Blocks:
    """Fixed-length blocks over a memory-mapped token file, in a seeded order per epoch."""

    def __init__(self, path: Path, dtype: str, block_size: int, seed: int):
        self.tokens: Any = (
            np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        )
        self.block_size = block_size
        self.n = len(self.tokens) // block_size
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def block(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i * self.block_size : (i + 1) * self.block_size], dtype=np.int64)

    def shuffled(self, k: int) -> np.ndarray:
        """The k-th sample of the endless shuffled stream (epoch = k // n)."""
        epoch, pos = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self.block(int(self._perm[1][pos]))

    def batch(self, first: int, count: int, shuffle: bool) -> np.ndarray:
        get = self.shuffled if shuffle else (lambda k: self.block(k % self.n))
        return np.stack([get(k) for k in range(first, first + count)])
