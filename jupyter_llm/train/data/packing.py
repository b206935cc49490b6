"""Packing: tokens appended to flat token files (with document spans for per-document
blocks), the validation split cut off their tail, and `Blocks`, fixed-length samples read
back from the memory-mapped files in a seeded order."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

BATCH_CHARS = 1 << 22  # characters per tokenizer batch: bounds memory, keeps all cores busy


def encode_to(
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


def split_doc_ends(src: Path, dst: Path, n_train: int) -> None:
    """Split document spans at token n_train (a document there is cut in two)."""
    spans = np.fromfile(src, dtype=np.int64).reshape(-1, 2)
    train = spans[spans[:, 0] < n_train]
    train[:, 1] = np.minimum(train[:, 1], n_train)
    train.tofile(src)
    val = spans[spans[:, 1] > n_train]
    val[:, 0] = np.maximum(val[:, 0], n_train)
    (val - n_train).astype(np.int64).tofile(dst)


def move_tail(src: Path, dst: Path, keep_bytes: int) -> None:
    """Move src's bytes after `keep_bytes` into dst (in chunks), then truncate src."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(keep_bytes)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            out.write(chunk)
    os.truncate(src, keep_bytes)


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
