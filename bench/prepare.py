"""Data preparation throughput versus `datasets.map(batched=True)`, and peak memory.

Corpus: the paragraphs of Tiny Shakespeare as JSONL documents, repeated to `--mb` MB.
Both sides use the same fast BPE tokenizer (trained once on Tiny Shakespeare) and produce
the same thing: every document's tokens followed by EOS, as one uint16 token file; the two
files are checked equal, token for token.

- baseline: `datasets.load_dataset("json")` -> `.map(tokenize, batched=True)` -> numpy
  packing (EOS inserted at the Arrow offsets) -> `tofile`;
- jupyter_llm: `tokenize_to_files`, what the prepare job and a run's data step execute.

Repetitions alternate which side goes first; tokens/s medians and their ratio are printed as
JSON. With `--big-mb`, jupyter_llm's preparation also runs in a child process on a corpus of
that size and its peak RSS (VmHWM) is reported.

    python bench/prepare.py [--mb 200] [--reps 3] [--big-mb 2048]   (--mb 0: only the RSS run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "examples" / "tinyshakespeare.txt"


def make_corpus(path: Path, mb: int) -> int:
    """JSONL of paragraphs, repeated to at least `mb` MB; returns the number of documents."""
    paras = [p for p in CORPUS.read_text().split("\n\n") if p.strip()]
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paras).encode()
    reps = -(-mb * 2**20 // len(lines))
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(lines)
    return reps * len(paras)


def make_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.data import build_tokenizer

    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "bpe", "vocab_size": 4096}},
                           "data": {"train": str(CORPUS)}})  # fmt: skip
    tok = build_tokenizer(spec, out)
    assert isinstance(tok, PreTrainedTokenizerFast)


def ours(data: Path, tok_dir: Path, out: Path) -> tuple[float, int]:
    from transformers import AutoTokenizer

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.data import tokenize_to_files

    spec = Spec.from_dict({"tokenizer": {"path": str(tok_dir)}, "train": {"eval_every": 0},
                           "data": {"train": str(data), "val_fraction": 0}})  # fmt: skip
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    index = tokenize_to_files(spec, tok, out)
    return time.perf_counter() - t0, index["splits"]["train"]["tokens"]


def baseline(data: Path, tok_dir: Path, out: Path, cache: Path) -> tuple[float, float, int]:
    """(seconds end to end, seconds of map + packing alone, tokens)."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    t1 = time.perf_counter()
    ds = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                batched=True, remove_columns=["text"])  # fmt: skip
    col = ds.data.column("ids").combine_chunks()
    values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
    packed = np.insert(values, offsets[1:], tok.eos_token_id).astype(np.uint16)
    packed.tofile(out / "train.bin")
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, len(packed)


def peak_rss(data: Path, tok_dir: Path, out: Path) -> dict[str, float]:
    """Our preparation alone in a child process: wall time and peak RSS."""
    # the child reports its own peak, VmHWM: its address space's high-water mark. Not
    # ru_maxrss: RUSAGE_CHILDREN counts every earlier child, and even RUSAGE_SELF keeps the
    # high-water mark of the address space it had before exec, i.e. this process's at fork
    code = (
        "import re, sys; sys.path.insert(0, sys.argv[1]); import prepare as b; from pathlib import Path; "
        "s, n = b.ours(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])); "
        "print(s, n, re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(HERE), str(data), str(tok_dir), str(out)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    secs, tokens, rss_kb = res.stdout.split()[-3:]
    return {"corpus_mb": round(data.stat().st_size / 2**20), "seconds": round(float(secs), 1),
            "tokens": int(tokens), "tokens_per_s": round(int(tokens) / float(secs)),
            "peak_rss_mb": round(int(rss_kb) / 1024)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=0, help="also measure peak RSS on a corpus this large")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp_s:
        tmp = Path(tmp_s)
        make_tokenizer(tmp / "tok")
        result: dict[str, object] = {"cpus": os.cpu_count()}
        if args.mb:
            result.update(compare(tmp, args.mb, args.reps))
        if args.big_mb:
            make_corpus(tmp / "big.jsonl", args.big_mb)
            (tmp / "big").mkdir()
            result["big"] = peak_rss(tmp / "big.jsonl", tmp / "tok", tmp / "big")
        print(json.dumps(result, indent=1))


def compare(tmp: Path, mb: int, reps: int) -> dict[str, object]:
    """Interleaved repetitions of both sides on the same corpus; outputs checked equal."""
    docs = make_corpus(tmp / "corpus.jsonl", mb)
    ours_tps, base_tps, map_tps = [], [], []
    tokens = 0
    for rep in range(reps):
        for side in ("ours", "base") if rep % 2 == 0 else ("base", "ours"):
            out = tmp / f"{side}-{rep}"
            out.mkdir()
            if side == "ours":
                secs, n = ours(tmp / "corpus.jsonl", tmp / "tok", out)
                ours_tps.append(n / secs)
            else:
                secs, map_secs, n = baseline(tmp / "corpus.jsonl", tmp / "tok", out, tmp / f"hf-{rep}")
                base_tps.append(n / secs)
                map_tps.append(n / map_secs)
        a = np.fromfile(tmp / f"ours-{rep}" / "train.bin", dtype=np.uint16)
        b = np.fromfile(tmp / f"base-{rep}" / "train.bin", dtype=np.uint16)
        assert np.array_equal(a, b), "outputs differ"
        tokens = len(a)
        for side in ("ours", "base"):
            for f in (tmp / f"{side}-{rep}").iterdir():
                f.unlink()
    (tmp / "corpus.jsonl").unlink()
    return {
        "corpus_mb": mb, "documents": docs, "tokens": tokens, "reps": reps, "same_output": True,
        "ours_tokens_per_s": round(statistics.median(ours_tps)),
        "datasets_tokens_per_s": round(statistics.median(base_tps)),
        "datasets_map_only_tokens_per_s": round(statistics.median(map_tps)),
        "ratio": round(statistics.median(ours_tps) / statistics.median(base_tps), 2),
        "ratio_vs_map_only": round(statistics.median(ours_tps) / statistics.median(map_tps), 2),
    }  # fmt: skip


if __name__ == "__main__":
    main()
