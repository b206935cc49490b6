"""Worker-side data: read and clean documents, build or train the tokenizer, pack blocks.

Rank 0 tokenizes once into a cache folder keyed by a hash of the inputs' contents, the
tokenizer and the parameters (`prepare`), written under a temporary name and renamed into
place, so a rerun is instant and an interrupted one leaves nothing that looks valid. Every
rank memory-maps the token files (uint16 when the vocabulary fits). Which samples a rank
sees at a given step is a pure function of (seed, step), so resuming needs only the step.

The parts, bottom to top: `sources` (reading the input files), `cleaning` (the one cleaning
path), `pairs` (supervised examples), `tokenizer`, `packing` (token files, `Blocks`) and
`cache` (the prepared-data cache, a run's data step).
"""

from __future__ import annotations

from .cache import FORMAT, cache_key, data_stage, prepare, tokenize_to_files
from .cleaning import Cleaner, Transform, documents
from .packing import Blocks
from .pairs import Segments
from .sources import DataError, Doc, Meter, read_documents
from .tokenizer import CAUSAL_SPECIALS, MASKED_SPECIALS, build_tokenizer

__all__ = [
    "CAUSAL_SPECIALS",
    "FORMAT",
    "MASKED_SPECIALS",
    "Blocks",
    "Cleaner",
    "DataError",
    "Doc",
    "Meter",
    "Segments",
    "Transform",
    "build_tokenizer",
    "cache_key",
    "data_stage",
    "documents",
    "prepare",
    "read_documents",
    "tokenize_to_files",
]
