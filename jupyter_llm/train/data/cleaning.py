"""Cleaning, the one path every document takes: the notebook's data `Transform`, then
`Cleaner` (normalise, strip control characters, filter by length, de-duplicate); `documents`
gives the cleaned pieces of the input files."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ...spec import CleanSpec, Spec
from .sources import DataError, read_documents

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
