"""Worker-side data: read and clean documents, build or train the tokenizer, pack blocks.

Rank 0 tokenizes once into a cache folder keyed by a hash of the inputs' contents, the
tokenizer and the parameters (`prepare`), written under a temporary name and renamed into
place, so a rerun is instant and an interrupted one leaves nothing that looks valid. Every
rank memory-maps the token files (uint16 when the vocabulary fits). Which samples a rank
sees at a given step is a pure function of (seed, step), so resuming needs only the step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections import Counter
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


FORMAT = 1  # bump when the layout of prepared data changes: old cache entries stop matching
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def documents(spec: Spec, files: list[str], stats: Counter[str] | None = None) -> Iterator[str]:
    """Cleaned documents of `files` as the spec's `data.clean` asks; counts into `stats`."""
    c = spec.data.clean
    stats = Counter() if stats is None else stats
    seen: set[bytes] = set()
    for doc in read_documents(files, spec.data.text_field):
        stats["documents_read"] += 1
        if c.normalize:
            doc = unicodedata.normalize(c.normalize, doc)
        if c.strip_control:
            doc = _CONTROL.sub("", doc)
        if len(doc) < max(c.min_chars, 1) or (c.max_chars and len(doc) > c.max_chars):
            stats["dropped_length"] += 1
            continue
        if c.dedup:
            digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
            if digest in seen:
                stats["duplicates"] += 1
                continue
            seen.add(digest)
        stats["documents"] += 1
        stats[f"len_2^{len(doc).bit_length()}"] += 1  # histogram of lengths, power-of-two bins
        yield doc


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
        for doc in documents(spec, spec.data.train):
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
    tok.train_from_iterator(documents(spec, spec.data.train), trainer=trainer)
    return tok


def cache_key(spec: Spec, tok: Any) -> str:
    """Hash of what the prepared data depends on: input contents (not paths), cleaning and
    split parameters, the task, and the tokenizer's full definition."""
    h = hashlib.sha256()
    d = spec.data
    params = {"format": FORMAT, "task": spec.model.task, "text_field": d.text_field,
              "val_fraction": None if d.validation else d.val_fraction, "clean": d.clean.model_dump()}  # fmt: skip
    h.update(json.dumps(params, sort_keys=True).encode())
    for group in (d.train, d.validation or []):
        h.update(b"\x00group")
        for f in group:
            h.update(file_sha256(f).encode())
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True).encode())
    return h.hexdigest()[:32]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(spec: Spec, tok: Any, cache_root: Path) -> tuple[Path, bool]:
    """The prepared-data folder for (spec, tok), and whether it came from the cache.

    Built under a temporary dot-name and renamed into place: a folder named by its key is
    always complete. Leftovers of killed writers (their pid gone) are removed.
    """
    cache_root.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec, tok)
    final = cache_root / key
    if (final / "index.json").is_file():
        return final, True
    _remove_stale(cache_root)
    tmp = cache_root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tokenize_to_files(spec, tok, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another writer finished first: theirs is identical
            if not (final / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def _remove_stale(cache_root: Path) -> None:
    import psutil

    for p in cache_root.glob(".*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def tokenize_to_files(spec: Spec, tok: Any, out_dir: Path) -> dict[str, Any]:
    """Tokenize train (and validation) text into flat token files; returns the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    d = spec.data
    sep = tok.eos_token_id if spec.model.task == "causal-lm" else tok.sep_token_id
    encode = _char_encoder(tok) if spec.tokenizer.train and spec.tokenizer.train.kind == "char" else None
    stats: Counter[str] = Counter()
    t0 = time.perf_counter()
    train = _encode(documents(spec, d.train, stats), tok, sep, encode)
    if d.validation:
        val = _encode(documents(spec, d.validation, stats), tok, sep, encode)
    else:
        n_val = int(len(train) * d.val_fraction)
        train, val = train[: len(train) - n_val], train[len(train) - n_val :]
    dtype = np.uint16 if len(tok) < 2**16 else np.uint32
    splits: dict[str, dict[str, int]] = {}
    for split, ids in (("train", train), ("val", val)):
        np.asarray(ids, dtype=dtype).tofile(out_dir / f"{split}.bin")
        splits[split] = {"tokens": len(ids)}
        if _fault_stall():  # half written: train.bin exists, val.bin and index.json do not
            time.sleep(3600)
    if not splits["train"]["tokens"]:
        raise DataError(f"no training text left in {', '.join(d.train)} after cleaning: {dict(stats)}")
    index = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": len(tok),
        "splits": splits,
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
