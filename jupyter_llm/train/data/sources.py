"""Reading the input files: text files in pieces, JSONL, CSV, Parquet and saved datasets, as
a stream of documents; bad input raises `DataError` naming the file and line."""

from __future__ import annotations

import codecs
import csv
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path


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
            Meter.bytes_read += size(path)
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


def size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder."""
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
