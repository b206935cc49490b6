"""Worker-side data: read and clean documents, build or train the tokenizer, pack blocks.

Rank 0 tokenizes once into a cache folder keyed by a hash of the inputs' contents, the
tokenizer and the parameters (`prepare`), written under a temporary name and renamed into
place, so a rerun is instant and an interrupted one leaves nothing that looks valid. Every
rank memory-maps the token files (uint16 when the vocabulary fits). Which samples a rank
sees at a given step is a pure function of (seed, step), so resuming needs only the step.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..folder import EVENTS_FILE
from ..hashing import content_sha256
from ..spec import CleanSpec, Spec
from . import bpe

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


class Meter:
    """Input bytes consumed so far, counted by the readers: the progress of a preparation."""

    bytes_read = 0


Doc = str | Callable[[], Iterator[str]]  # one string, or a text file's pieces (re-readable)
PIECE_CHARS = 1 << 20  # a text file is read and tokenized in pieces of about this many characters


def read_documents(files: list[str], text_field: str) -> Iterator[Doc]:
    """Documents, streamed: .txt/.md (one per file, in pieces), .jsonl (one per line),
    .csv (one per row), .parquet (one per row of `text_field`), and datasets saved with
    `save_to_disk` (one per row)."""
    for name in files:
        path = Path(name)
        if path.is_dir():
            yield from _saved_dataset(path, text_field)
            Meter.bytes_read += _size(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl(path, text_field)
        elif path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if text_field not in (reader.fieldnames or []):
                    raise DataError(
                        f"{path}: no column {text_field!r} (data.text_field); columns: {reader.fieldnames}"
                    )
                for row in reader:
                    yield row[text_field]
            Meter.bytes_read += path.stat().st_size
        elif path.suffix == ".parquet":
            yield from _parquet(path, text_field)
            Meter.bytes_read += path.stat().st_size
        else:
            yield functools.partial(_text_pieces, path)


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            Meter.bytes_read += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r} (data.text_field)")
            yield obj[text_field]


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {names}")
    row = 0
    for batch in f.iter_batches(batch_size=4096, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: {text_field!r} is {value!r}, not a string")
            yield value


def _saved_dataset(path: Path, text_field: str) -> Iterator[str]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))  # memory-mapped Arrow: rows are streamed, not loaded
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {ds.column_names}")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=4096):
        for value in batch[text_field]:
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: {text_field!r} is {value!r}, not a string")
            yield value


def _text_pieces(path: Path) -> Iterator[str]:
    """A text file's content in pieces of about PIECE_CHARS, with universal newlines.

    Pieces end after a newline that is followed by a non-space character, where byte-level
    BPE, WordPiece and character tokenizers split anyway: tokenizing the pieces gives the
    tokens of the whole text. The file is never held in memory whole.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0  # bytes decoded before the current block
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(PIECE_CHARS)
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {done + e.start})") from None
            done += len(raw)
            Meter.bytes_read += len(raw)
            if not raw:
                if text:
                    yield _newlines(text)
                return
            cut = _safe_cut(text)
            if cut:
                yield _newlines(text[:cut])
            carry = text[cut:]


_CUT = re.compile(r"\n(?=\S)")


def _safe_cut(text: str) -> int:
    """Index just after the last newline followed by a non-space character (0: none)."""
    start = max(0, len(text) - PIECE_CHARS // 2)
    for m in reversed(list(_CUT.finditer(text, start))):
        return m.end()
    return len(text) if len(text) > 64 * PIECE_CHARS else 0  # no cut point at all: force one


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


FORMAT = 3  # bump when the layout of prepared data changes: old cache entries stop matching
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class Cleaner:
    """`data.clean`, the one set of rules for every kind of document (a text file, a JSONL or
    Parquet record, a prompt/response pair, a chat): normalise, strip control characters, drop
    what is too short or too long (an empty document always), drop exact duplicates; counts
    why each dropped document went into `stats`."""

    def __init__(self, clean: CleanSpec, stats: Counter[str]):
        self.c, self.stats, self.seen = clean, stats, set[bytes]()

    def text(self, piece: str) -> str:
        if self.c.normalize:
            piece = unicodedata.normalize(self.c.normalize, piece)
        return _CONTROL.sub("", piece) if self.c.strip_control else piece

    def keep(self, n: int, digest: bytes) -> bool:
        """Keep a document of `n` characters (after cleaning) and content hash `digest`?"""
        if n < max(self.c.min_chars, 1) or (self.c.max_chars and n > self.c.max_chars):
            self.stats["dropped_length"] += 1
            return False
        if self.c.dedup:
            if digest in self.seen:
                self.stats["duplicates"] += 1
                return False
            self.seen.add(digest)
        return True

    def kept(self, n: int) -> None:
        self.stats["documents"] += 1
        self.stats[f"len_2^{n.bit_length()}"] += 1  # histogram of lengths, power-of-two bins


def documents(
    spec: Spec, files: list[str], stats: Counter[str] | None = None, transform: Transform | None = None
) -> Iterator[tuple[str, bool]]:
    """Cleaned documents of `files` as the spec's `data.clean` asks, as (piece, ends document)
    pairs in order; counts into `stats`. A text file is filtered and de-duplicated as one
    document, from a first streaming pass over it when a filter needs its length or hash."""
    stats = Counter() if stats is None else stats
    cleaner = Cleaner(spec.data.clean, stats)
    c = spec.data.clean

    def keep(pieces: Iterable[str]) -> bool:
        n, h = 0, hashlib.blake2b(digest_size=16)
        for p in pieces:
            n += len(p)
            if c.dedup:
                h.update(p.encode())
        return cleaner.keep(n, h.digest())

    def emit(pieces: Iterable[str]) -> Iterator[tuple[str, bool]]:
        n = 0
        last: str | None = None
        for p in pieces:  # emitted one behind, to flag the last piece
            if not p:
                continue
            if last is not None:
                yield last, False
            n += len(p)
            last = p
        if last is None:  # an empty text file
            stats["dropped_length"] += 1
            return
        yield last, True
        cleaner.kept(n)

    whole = c.dedup or c.max_chars is not None or c.min_chars > 1
    for doc in read_documents(files, spec.data.text_field):
        stats["documents_read"] += 1
        if isinstance(doc, str):
            for text in _transformed(transform, doc, stats):
                if keep(pieces := [cleaner.text(text)]):
                    yield from emit(pieces)
        else:

            def read(doc: Any = doc) -> Iterator[str]:
                for piece in doc():
                    yield from (cleaner.text(t) for t in _transformed(transform, piece, stats, joined=True))

            if whole and not keep(read()):
                continue
            yield from emit(read())


class Transform:
    """A user function applied to every document before cleaning, shipped to the detached job
    with cloudpickle (so a function defined in a notebook works there). It returns the new
    text, None to drop the document, or a list of texts (several documents; for a text file's
    pieces, joined). `digest` (of the pickled bytes) is part of the cache key."""

    FILE = "transform.pkl"

    def __init__(self, fn: Callable[[str], Any], blob: bytes):
        self.fn, self.digest = fn, hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, run_dir: Path) -> Transform | None:
        import pickle

        f = run_dir / cls.FILE
        if not f.is_file():
            return None
        blob = f.read_bytes()
        try:
            return cls(pickle.loads(blob), blob)
        except Exception as e:
            raise DataError(
                f"could not load the data transform ({type(e).__name__}: {e}); a module it uses "
                "must be importable by the job's Python too"
            ) from None


def _transformed(
    transform: Transform | None, text: str, stats: Counter[str], joined: bool = False
) -> list[str]:
    if transform is None:
        return [text]
    try:
        out = transform.fn(text)
    except Exception as e:
        raise DataError(
            f"the data transform raised {type(e).__name__}: {e} (on document {stats['documents_read']})"
        ) from None
    if out is None:
        stats["dropped_transform"] += 1
        return []
    if isinstance(out, str):
        return [out]
    if isinstance(out, list | tuple) and all(isinstance(t, str) for t in out):
        return ["".join(out)] if joined else list(out)
    raise DataError(
        f"the data transform returned a {type(out).__name__}; return a str, None or a list of str"
    )


def build_tokenizer(spec: Spec, out_dir: Path, transform: Transform | None = None) -> Any:
    """Load the tokenizer the spec names, or train one on the training text; save to out_dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = spec.tokenizer_source()
    if source is not None:
        tok = AutoTokenizer.from_pretrained(source)
    else:
        train = spec.tokenizer.train
        kind, vocab = (train.kind, train.vocab_size) if train else ("char", 0)
        specials = MASKED_SPECIALS if spec.model.task == "masked-lm" else CAUSAL_SPECIALS
        raw = _train_tokenizer(kind, vocab, list(specials.values()), spec, transform)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
        if spec.model.task == "causal-lm":
            tok.bos_token = tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.model_max_length = 2**62  # we pack long streams ourselves; silence length warnings
    if spec.tokenizer.chat_template:
        tok.chat_template = spec.tokenizer.chat_template  # saved with it: generation uses it too
    tok.save_pretrained(out_dir)
    return tok


def _train_tokenizer(
    kind: str, vocab_size: int, specials: list[str], spec: Spec, transform: Transform | None = None
) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    unk = "[UNK]" if "[UNK]" in specials else "<unk>"
    if kind == "char":
        # the vocabulary is the set of characters: collected directly, far faster than a
        # trainer that sees every character as a pre-token
        chars: set[str] = set()
        for piece in _training_texts(spec, transform):
            chars.update(piece)
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
    tok.train_from_iterator(_training_texts(spec, transform), trainer=trainer)
    return tok


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

    from ..files import append_jsonl, now_iso, write_json_atomic

    tok_dir = run_dir / "tokenizer"
    transform = Transform.load(run_dir)
    files = [Path(f) for f in [*spec.data.train, *(spec.data.validation or [])]]
    total = sum(_size(f) for f in files)
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
    append_jsonl(run_dir / EVENTS_FILE, {"time": now_iso(), "event": "data_ready", "path": str(data_dir),
                                            "cached": hit, "tokens": index["splits"], **index["stats"]})  # fmt: skip
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
    encode = _char_encoder(tok) if spec.tokenizer.train and spec.tokenizer.train.kind == "char" else None
    encode = encode or _batch_encoder(tok)
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
            return _encode_examples_to(path, _supervised(spec, files, stats, tok), encode, sep, dtype, report)
        return _encode_to(path, documents(spec, files, stats, transform), encode, sep, dtype, report, per_doc)

    n_train = write(d.train, train_bin)
    if _fault_stall():  # half written: train.bin exists, val.bin and index.json do not
        time.sleep(3600)
    if d.validation:
        n_val = write(d.validation, val_bin, n_train)
    else:
        n_val = int(n_train * d.val_fraction)
        n_train -= n_val
        _move_tail(train_bin, val_bin, n_train * np.dtype(dtype).itemsize)
        if pairs:
            _move_tail(train_bin.with_suffix(".mask"), val_bin.with_suffix(".mask"), n_train)
        if per_doc:
            _split_doc_ends(train_bin.with_suffix(".docs"), val_bin.with_suffix(".docs"), n_train)
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


Segments = list[tuple[str, bool]]  # an example's text in order; True where the loss counts


def _supervised(spec: Spec, files: list[str], stats: Counter[str], tok: Any = None) -> Iterator[Segments]:
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


def _encode_examples_to(
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


def _training_texts(spec: Spec, transform: Transform | None) -> Iterator[str]:
    """The text a tokenizer is trained on: document pieces, or prompts and responses."""
    if spec.data.format != "text":
        for segs in _supervised(spec, spec.data.train, Counter()):
            yield from (t for t, _ in segs)
    else:
        for piece, _ in documents(spec, spec.data.train, transform=transform):
            yield piece


def _split_doc_ends(src: Path, dst: Path, n_train: int) -> None:
    """Split document spans at token n_train (a document there is cut in two)."""
    spans = np.fromfile(src, dtype=np.int64).reshape(-1, 2)
    train = spans[spans[:, 0] < n_train]
    train[:, 1] = np.minimum(train[:, 1], n_train)
    train.tofile(src)
    val = spans[spans[:, 1] > n_train]
    val[:, 0] = np.maximum(val[:, 0], n_train)
    (val - n_train).astype(np.int64).tofile(dst)


def _move_tail(src: Path, dst: Path, keep_bytes: int) -> None:
    """Move src's bytes after `keep_bytes` into dst (in chunks), then truncate src."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(keep_bytes)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            out.write(chunk)
    os.truncate(src, keep_bytes)


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


def _batch_encoder(tok: Any) -> Any:
    """Batched encoding with the fast tokenizer's Rust core (parallel over all cores), or with
    tiktoken's when it gives the same tokens (`bpe`)."""
    from tokenizers import Tokenizer

    core = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.no_truncation()  # as `tok(text)` does: a saved tokenizer may carry these settings
    core.no_padding()

    # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which packing never needs
    batch = getattr(core, "encode_batch_fast", core.encode_batch)

    def encode(pieces: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in batch(pieces, add_special_tokens=False)]

    fast = bpe.encoder(tok)  # byte-level BPEs: the same tokens from tiktoken's engine
    return bpe.checked(fast, encode) if fast else encode


BATCH_CHARS = 1 << 22  # characters per tokenizer batch: bounds memory, keeps all cores busy


def _encode_to(
    path: Path,
    docs: Iterator[tuple[str, bool]],
    encode: Any,
    sep: int | None,
    dtype: Any,
    progress: Callable[[int], None] | None = None,
    doc_ends: bool = False,
) -> int:
    """Append the tokens of `docs` (a separator after each document) to `path`; token count.
    With `doc_ends`, each document's (start, end) token offsets, without its separator, go to
    `path`.docs (int64 pairs), for per-document blocks."""
    pieces: list[str] = []
    ends: list[bool] = []
    chars = total = 0
    tail = np.asarray([sep] if sep is not None else [], dtype=np.int64)
    with (
        open(path, "wb") as out,
        open(path.with_suffix(".docs"), "wb") if doc_ends else nullcontext() as docs_out,
    ):
        begin = [0]  # where the current document started

        def flush() -> int:
            parts = []
            spans: list[int] = []
            n = total
            for ids, end in zip(encode(pieces), ends, strict=True):
                parts.append(ids)
                n += len(ids)
                if end:
                    spans += [begin[0], n]  # the document's tokens, without the separator
                    parts.append(tail)
                    n += len(tail)
                    begin[0] = n
            pieces.clear()
            ends.clear()
            flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
            flat.tofile(out)
            if docs_out is not None:
                np.asarray(spans, dtype=np.int64).tofile(docs_out)
            return len(flat)

        for piece, end in docs:
            pieces.append(piece)
            ends.append(end)
            chars += len(piece)
            if chars >= BATCH_CHARS or len(pieces) >= 4096:
                total += flush()
                chars = 0
                if progress:
                    progress(total)
        if pieces:
            total += flush()
    return total


class Blocks:
    """Fixed-length blocks over a memory-mapped token file, in a seeded order per epoch.

    With document spans beside it (`train.docs`, masked LMs) blocks never cross documents:
    each document (without its separator) is cut into `block_size` chunks and the last one
    is padded with `pad_id`; `lengths` gives the real tokens of each. With a loss mask beside
    it (`train.mask`, prompt/response data) `mask_batch` gives the mask of the same samples.
    """

    def __init__(self, path: Path, dtype: str, block_size: int, seed: int, pad_id: int = 0):
        self.tokens: Any = (
            np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        )
        mask = path.with_suffix(".mask")
        self.mask: Any = None
        if mask.is_file():
            self.mask = (
                np.memmap(mask, dtype=np.uint8, mode="r") if mask.stat().st_size else np.zeros(0, np.uint8)
            )
        self.block_size = block_size
        self.pad_id = pad_id
        self.starts: np.ndarray | None = None
        self.lens: np.ndarray | None = None
        docs = path.with_suffix(".docs")
        if docs.is_file():
            spans = np.fromfile(docs, dtype=np.int64).reshape(-1, 2)
            begins, content = spans[:, 0], np.maximum(spans[:, 1] - spans[:, 0], 0)
            chunks = -(-content // block_size)
            first: np.ndarray = np.repeat(begins, chunks)
            nth = np.arange(int(chunks.sum())) - np.repeat(np.cumsum(chunks) - chunks, chunks)
            self.starts = first + nth * block_size
            self.lens = np.minimum(block_size, np.repeat(spans[:, 1], chunks) - self.starts)
            self.n = len(self.starts)
        else:
            self.n = len(self.tokens) // block_size
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def block(self, i: int) -> np.ndarray:
        if self.starts is None or self.lens is None:
            return np.asarray(self.tokens[i * self.block_size : (i + 1) * self.block_size], dtype=np.int64)
        out: np.ndarray = np.full(self.block_size, self.pad_id, dtype=np.int64)
        s, n = int(self.starts[i]), int(self.lens[i])
        out[:n] = self.tokens[s : s + n]
        return out

    def index(self, k: int, shuffle: bool) -> int:
        """The block that sample k of the stream is (epoch = k // n; shuffled per epoch)."""
        if not shuffle:
            return k % self.n
        epoch, pos = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][pos])

    def shuffled(self, k: int) -> np.ndarray:
        """The k-th sample of the endless shuffled stream."""
        return self.block(self.index(k, True))

    def indices(self, first: int, count: int, shuffle: bool) -> np.ndarray:
        """The blocks that samples first .. first+count-1 of the stream are, as `index` gives
        them one at a time (one permutation per epoch the range touches)."""
        ks: np.ndarray = np.arange(first, first + count, dtype=np.int64)
        if not shuffle:
            return ks % self.n
        epochs, pos = np.divmod(ks, self.n)
        out: np.ndarray = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (int(epoch), np.random.default_rng([self.seed, int(epoch)]).permutation(self.n))
            out[at] = self._perm[1][pos[at]]
        return out

    def batch(self, first: int, count: int, shuffle: bool) -> np.ndarray:
        """[count, block_size] int64 token ids: one gather from the token file, no per-sample
        Python work."""
        idx, cols = self.indices(first, count, shuffle), np.arange(self.block_size)
        if self.starts is None or self.lens is None:
            return np.asarray(self.tokens[idx[:, None] * self.block_size + cols], dtype=np.int64)
        real = cols < self.lens[idx][:, None]  # a document's last chunk is padded
        where = np.where(real, self.starts[idx][:, None] + cols, 0)
        return np.where(real, np.asarray(self.tokens[where], dtype=np.int64), self.pad_id)

    def lengths(self, first: int, count: int, shuffle: bool) -> np.ndarray:
        """Real (unpadded) tokens of the same samples as `batch`."""
        if self.lens is None:
            return np.full(count, self.block_size, dtype=np.int64)
        return np.asarray(self.lens[self.indices(first, count, shuffle)], dtype=np.int64)

    def mask_batch(self, first: int, count: int, shuffle: bool) -> np.ndarray | None:
        """The loss mask of the same samples as `batch` (None without a mask)."""
        if self.mask is None:
            return None
        idx = self.indices(first, count, shuffle)
        return np.asarray(self.mask[idx[:, None] * self.block_size + np.arange(self.block_size)], dtype=bool)
