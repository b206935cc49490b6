"""The tokenizer: loaded from where the spec names, or trained (char, BPE, WordPiece) on the
cleaned training text; and the batch encoders that tokenize for packing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...spec import Spec
from .. import bpe
from .cleaning import Transform, documents
from .pairs import supervised

CAUSAL_SPECIALS = {"eos_token": "<|endoftext|>", "unk_token": "<unk>"}
MASKED_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


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


def _training_texts(spec: Spec, transform: Transform | None) -> Iterator[str]:
    """The text a tokenizer is trained on: document pieces, or prompts and responses."""
    if spec.data.format != "text":
        for segs in supervised(spec, spec.data.train, Counter()):
            yield from (t for t, _ in segs)
    else:
        for piece, _ in documents(spec, spec.data.train, transform=transform):
            yield piece


def char_encoder(tok: Any) -> Any:
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


def batch_encoder(tok: Any) -> Any:
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
