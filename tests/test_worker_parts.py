"""Pure pieces of the launcher and the worker, without starting DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from conftest import wait_for
from jupyter_llm.launcher.local import build_command, free_port, port_free
from jupyter_llm.spec import Spec


def test_build_command_is_exact(tmp_path: Path) -> None:
    argv, env = build_command(tmp_path, 2, 29511, attempt=3, python="/venv/bin/py",
                              base_env={"PATH": "/bin:/venv/bin"}, cores=8)  # fmt: skip
    assert argv == ["/venv/bin/py", "-u", "-m", "jupyter_llm.launcher.ranks", "--ranks=2", "--master-addr=127.0.0.1",
                    "--master-port=29511", "jupyter_llm.train", str(tmp_path)]  # fmt: skip
    assert env["OMP_NUM_THREADS"] == "4" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["JUPYTER_LLM_ATTEMPT"] == "3" and env["JUPYTER_LLM_JOB"] == f"{tmp_path.name}:3"
    assert env["PATH"] == "/venv/bin:/bin"  # the venv's tools (ninja for DeepSpeed's JIT ops) first
    _, gpu_env = build_command(tmp_path, 8, 1, cpu=False, base_env={})
    assert "OMP_NUM_THREADS" not in gpu_env
    _, user = build_command(tmp_path, 2, 1, base_env={"OMP_NUM_THREADS": "7"})
    assert user["OMP_NUM_THREADS"] == "7"  # the user's setting wins


MMAP_PROBE = r"""
import ctypes, sys
from jupyter_llm.spec import Spec
from jupyter_llm.train.loop import malloc_thresholds

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2: hblks counts mmapped blocks
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Mallinfo2, ctypes.c_void_p
spec = Spec.from_yaml("model: {config: {model_type: gpt2}}\ndata: {train: [x]}\n"
                      f"distributed: {{zero_stage: {sys.argv[1]}}}", check_files=False)
chosen = malloc_thresholds(spec)
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)  # 1 MiB: mmapped under 128 KiB, from the heap under 4 MiB
print(chosen, libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
# a step's worth of heap blocks freed: how much of the heap stays (MiB), not given back
heap = libc.mallinfo2().arena
blocks = [libc.malloc(1 << 20) for _ in range(32)]
for b in reversed(blocks):
    libc.free(ctypes.c_void_p(b))
print((libc.mallinfo2().arena - heap) >> 20)
"""


def test_ranks_fix_malloc_thresholds_by_memory_regime() -> None:
    """A run fitted to memory (ZeRO-3 or offload) keeps every block above 128 KiB mmapped, so
    freed tensors go back to the system; any other run keeps blocks up to 4 MiB on the heap
    (no mmap and page zeroing per activation) and keeps what a step frees on the heap rather than
    giving it back to be faulted in again at the next step; MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ in the environment win."""
    import os
    import subprocess
    import sys

    def probe(stage: int, **env: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", MMAP_PROBE, str(stage)], capture_output=True, text=True,
                             check=True, env={**os.environ, **env})  # fmt: skip
        return out.stdout.split()

    assert probe(3) == [str(128 * 1024), "1", "0"]  # mmapped: nothing on the heap
    fast = probe(0)
    assert fast[:2] == [str(4 * 2**20), "0"] and int(fast[2]) >= 31  # 32 MiB freed, kept
    assert probe(0, MALLOC_TRIM_THRESHOLD_="131072")[2] == "0"  # given back at once
    assert probe(0, MALLOC_MMAP_THRESHOLD_="65536")[:2] == ["None", "1"]


def test_cuda_visible_devices_chooses_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it (indices, UUID prefixes, up to the first entry
    naming no GPU), and the launch takes those GPUs: DeepSpeed's launcher would otherwise
    take GPUs 0..N-1."""
    from jupyter_llm import devices

    smi = [f"GPU {i}: NVIDIA H200 (UUID: GPU-{i}aaa-{i})" for i in range(4)]
    assert devices.visible_gpus({}, smi) is None
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, smi) == [2, 3]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-3aaa,0"}, smi) == [3, 0]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "1,7,2"}, smi) == [1]  # 7 is no GPU: CUDA stops
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, smi) == []
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "1,1"}, smi) == [1]
    monkeypatch.setattr(devices, "_smi_gpus", lambda: smi)
    argv, _ = build_command(tmp_path, 2, 1, cpu=False, base_env={"CUDA_VISIBLE_DEVICES": "3,1,2"})
    assert "--devices=3,1" in argv  # the first two visible GPUs, one per rank
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices.gpu_count() == 2  # procs_per_node: auto counts the visible GPUs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.gpu_count() == 4


def test_free_port_avoids_taken() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_free(taken)
        got = free_port(taken)
        assert got != taken and port_free(got)


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    f = tmp_path / "c.txt"
    f.write_text(
        "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50 + "All:\nSpeak, speak.\n"
    )
    return f


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_trained_tokenizer_and_packing_match_reference(kind: str, small_corpus: Path, tmp_path: Path) -> None:
    """The packed token stream equals a direct tokenization of the same text, token for token."""
    from jupyter_llm.train.data import build_tokenizer, tokenize_to_files

    task = "masked-lm" if kind == "wordpiece" else "causal-lm"
    spec = Spec.from_dict({"model": {"task": task}, "tokenizer": {"train": {"kind": kind, "vocab_size": 120}},
                           "data": {"train": str(small_corpus), "val_fraction": 0.2}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    text = small_corpus.read_text()
    sep = tok.eos_token_id if task == "causal-lm" else tok.sep_token_id
    reference = [*tok(text, add_special_tokens=False)["input_ids"], sep]
    packed = np.concatenate(
        [np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=index["dtype"]) for s in ("train", "val")]
    )
    assert packed.tolist() == reference
    assert index["dtype"] == "uint16"
    assert index["splits"]["val"]["tokens"] == int(len(reference) * 0.2)
    if kind != "wordpiece":  # wordpiece normalises whitespace away
        assert tok.decode(reference[:-1]) == text
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text, add_special_tokens=False)["input_ids"] == reference[:-1]


def _read(path: Path, field: str = "text") -> list[str]:
    from jupyter_llm.train.data import read_documents

    return ["".join(d()) if callable(d) else d for d in read_documents([str(path)], field)]


def test_bad_data_names_file_and_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from jupyter_llm.train.data import DataError

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: no string field 'text'"):
        _read(f)
    f.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        _read(f)
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        _read(f)
    b = tmp_path / "b.txt"
    b.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"b.txt: not UTF-8 text \(byte 0\)"):
        _read(b)
    b.write_bytes(b"fine text\n" * 10 + b"\x89PNG")
    with pytest.raises(DataError, match=r"b.txt: not UTF-8 text \(byte 100\)"):
        _read(b)
    c = tmp_path / "d.csv"
    c.write_text("title,body\na,b\n")
    with pytest.raises(DataError, match=r"d.csv: no column 'text'.*\['title', 'body'\]"):
        _read(c)
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), pqf)
    with pytest.raises(DataError, match=r"d.parquet: no column 'text'.*\['body'\]"):
        _read(pqf)
    pq.write_table(pa.table({"text": ["x", None]}), pqf)
    with pytest.raises(DataError, match=r"d.parquet: row 2: 'text' is None"):
        _read(pqf)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        _read(tmp_path / "junk.parquet")
    Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match=r"ds: no column 'text'.*\['body'\]"):
        _read(tmp_path / "ds")


def test_data_folders_are_checked_by_the_spec(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from jupyter_llm.errors import SpecError

    d = Dataset.from_dict({"text": ["a b c"]})
    DatasetDict({"train": d, "test": d}).save_to_disk(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    (tmp_path / "empty.txt").write_text("")
    for path, msg in (("dd", "is a DatasetDict; name one split's folder"), ("plain", "no state.json"),
                      ("empty.txt", "file is empty")):  # fmt: skip
        with pytest.raises(SpecError, match=msg):
            Spec.from_dict({"data": {"train": str(tmp_path / path)}})
    spec = Spec.from_dict({"data": {"train": str(tmp_path / "dd" / "train")}})
    assert spec.data.train == [str(tmp_path / "dd" / "train")]


@pytest.mark.parametrize("source", ["parquet", "saved-dataset", "csv"])
def test_table_sources_pack_like_reference(source: str, small_corpus: Path, tmp_path: Path) -> None:
    """Rows of Parquet files, saved datasets and CSV become documents, token for token."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from jupyter_llm.train.data import build_tokenizer, tokenize_to_files

    rows = [ln for ln in small_corpus.read_text().split("\n\n") if ln.strip()]
    path = tmp_path / {"parquet": "d.parquet", "saved-dataset": "ds", "csv": "d.csv"}[source]
    if source == "parquet":
        pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), path, row_group_size=7)
    elif source == "saved-dataset":
        Dataset.from_dict({"body": rows}).save_to_disk(path)
    else:
        import csv

        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["body"], *[[r] for r in rows]])
    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "bpe", "vocab_size": 300}},
                           "data": {"train": str(path), "text_field": "body", "val_fraction": 0},
                           "train": {"eval_every": 0}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    reference = [t for r in rows for t in [*tok(r, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert np.fromfile(tmp_path / "data" / "train.bin", dtype=index["dtype"]).tolist() == reference
    assert index["stats"]["documents"] == len(rows)


def test_large_text_streams_in_pieces_token_for_token(corpus: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """A text file read in small pieces (cut after newlines) packs exactly like the whole text,
    Windows newlines included; filters see the whole document."""
    from jupyter_llm.train import data
    from jupyter_llm.train.data import packing, sources

    text = corpus.read_text()[:60_000]
    small_corpus = tmp_path / "part.txt"
    small_corpus.write_text(text)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "bpe", "vocab_size": 300}},
                           "data": {"train": [str(small_corpus), str(crlf)], "val_fraction": 0.1,
                                    "clean": {"dedup": True}}})  # fmt: skip
    tok = data.build_tokenizer(spec, tmp_path / "tok")
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)  # read where the readers and packer look
    monkeypatch.setattr(packing, "BATCH_CHARS", 3000)
    pieces = list(data.documents(spec, spec.data.train))
    assert (
        len(pieces) > 50 and max(len(p) for p, _ in pieces) < 2000 and [e for _, e in pieces].count(True) == 1
    )
    index = data.tokenize_to_files(spec, tok, tmp_path / "data")
    assert index["stats"] == {"documents": 1, "documents_read": 2, "duplicates": 1}  # crlf.txt == corpus
    reference = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    packed = np.concatenate(
        [np.fromfile(tmp_path / "data" / f"{s}.bin", dtype=index["dtype"]) for s in ("train", "val")]
    )
    assert packed.tolist() == reference
    assert index["splits"]["val"]["tokens"] == int(len(reference) * 0.1)


def test_blocks_order_is_a_pure_function_of_seed(tmp_path: Path) -> None:
    from jupyter_llm.train.data import Blocks

    f = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(f)
    a, b = Blocks(f, "uint16", 10, seed=7), Blocks(f, "uint16", 10, seed=7)
    assert a.n == 100
    first_epoch = a.batch(0, 100, shuffle=True)
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 1000, 10))  # each block once per epoch
    assert np.array_equal(b.batch(37, 5, shuffle=True), first_epoch[37:42])  # resumable from any position
    assert not np.array_equal(Blocks(f, "uint16", 10, seed=8).batch(0, 100, True), first_epoch)
    assert np.array_equal(a.batch(100, 3, True), a.batch(100, 3, True))  # epoch 1 stable too
    # one gather per batch gives what one block at a time gives, across an epoch's end too
    for first, count, shuffle in ((95, 10, True), (0, 7, False), (195, 12, False), (250, 1, True)):
        one_by_one = np.stack([a.block(a.index(k, shuffle)) for k in range(first, first + count)])
        assert np.array_equal(b.batch(first, count, shuffle), one_by_one)
    # document blocks (padded last chunks) and loss masks likewise
    np.array([[0, 25], [26, 31], [32, 1000]], dtype=np.int64).tofile(f.with_suffix(".docs"))
    (np.arange(1000) % 3 == 0).astype(np.uint8).tofile(f.with_suffix(".mask"))
    d = Blocks(f, "uint16", 10, seed=7, pad_id=65000)
    ks = range(d.n - 4, d.n + 3)
    assert np.array_equal(d.batch(d.n - 4, 7, True), np.stack([d.block(d.index(k, True)) for k in ks]))
    assert d.lengths(d.n - 4, 7, True).tolist() == [int(d.lens[d.index(k, True)]) for k in ks]  # type: ignore[index]
    assert (d.batch(0, d.n, False) == 65000).sum() == 5 + 5 + 2  # 25, 5 and 968 tokens padded to 10s
    m = Blocks(f, "uint16", 10, seed=3)
    want = np.stack(
        [np.asarray(m.mask[(i := m.index(k, True)) * 10 : (i + 1) * 10], bool) for k in range(98, 104)]
    )
    assert np.array_equal(m.mask_batch(98, 6, True), want)


def test_mlm_masking_is_seeded_and_spares_specials(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from conftest import minilm_path
    from jupyter_llm.train.loop import _mask_tokens

    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids = torch.tensor([tok("to be or not to be, that is the question " * 6)["input_ids"][:64]] * 8)
    x1, y1 = _mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(1))
    x2, y2 = _mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    chosen = y1 != -100
    assert 0.08 < chosen.float().mean() < 0.22
    assert not chosen[:, 0].any()  # [CLS] never masked
    assert torch.equal(y1[chosen], ids[chosen])
    assert (x1[chosen] == tok.mask_token_id).float().mean() > 0.6


def test_flops_per_token_matches_nanogpt_formula() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from jupyter_llm.train.model import flops_per_token, peak_flops

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32))
    n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()
    assert flops_per_token(m, 32) == 6 * n + 12 * 2 * 4 * 16 * 32
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Some CPU") is None


def test_checkpoint_listing_ignores_unmarked(tmp_path: Path) -> None:
    from jupyter_llm.train.checkpoint import CheckpointError, complete_checkpoints, prune

    ck = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        (ck / f"step{step:08d}").mkdir(parents=True)
        if step != 40:
            (ck / f"step{step:08d}" / "COMPLETE").write_text(json.dumps({"step": step}))
    assert [s for s, _ in complete_checkpoints(ck)] == [10, 20, 30]
    prune(ck, keep=2)
    assert sorted(p.name for p in ck.iterdir()) == ["step00000020", "step00000030"]
    (ck / "step00000030" / "COMPLETE").write_text("garbage")
    with pytest.raises(CheckpointError, match="step00000030"):
        complete_checkpoints(ck)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 5, None])
def test_derived_schedules_build_in_deepspeed(scheduler: str, warmup: int | None, corpus: Path) -> None:
    """Every derived scheduler config is accepted by DeepSpeed's own classes; no warmup means
    full lr from the first step, and cosine ends at min_lr."""
    import torch
    from deepspeed.runtime import lr_schedules

    from jupyter_llm.spec import deepspeed_config

    spec = Spec.from_dict({"data": {"train": str(corpus)}, "train": {"max_steps": 50},
                           "optim": {"lr": 1e-3, "min_lr": 1e-4, "scheduler": scheduler, "warmup_steps": warmup}})  # fmt: skip
    sched_cfg = deepspeed_config(spec)["scheduler"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = getattr(lr_schedules, sched_cfg["type"])(opt, **sched_cfg["params"])
    lrs = []
    for _ in range(50):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if warmup == 0:
        assert lrs[0] == pytest.approx(1e-3)
    else:
        assert lrs[0] < 1e-3
    assert max(lrs) == pytest.approx(1e-3, rel=0.01)
    if scheduler == "cosine":
        assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_char_fast_path_handles_unseen_characters(small_corpus: Path, tmp_path: Path) -> None:
    from jupyter_llm.train.data import build_tokenizer, tokenize_to_files

    val = tmp_path / "val.txt"
    val.write_text("Speak — speak, 你好! \x00 tab\there\n")
    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "char"}},
                           "data": {"train": str(small_corpus), "validation": str(val)}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    got = np.fromfile(tmp_path / "data" / "val.bin", dtype=index["dtype"]).tolist()
    assert got == [*tok(val.read_text(), add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert tok.unk_token_id in got


def _prep_spec(corpus: Path, **clean: Any) -> Spec:
    return Spec.from_dict({"tokenizer": {"train": {"kind": "char"}},
                           "data": {"train": str(corpus), "clean": clean}})  # fmt: skip


def test_prepare_cache_hits_and_misses(small_corpus: Path, tmp_path: Path) -> None:
    from jupyter_llm.train.data import build_tokenizer, prepare

    spec = _prep_spec(small_corpus)
    tok = build_tokenizer(spec, tmp_path / "tok")
    cache = tmp_path / "cache"
    first, hit1 = prepare(spec, tok, cache)
    mtime = (first / "train.bin").stat().st_mtime_ns
    again, hit2 = prepare(spec, tok, cache)
    assert (hit1, hit2) == (False, True) and again == first
    assert (first / "train.bin").stat().st_mtime_ns == mtime  # not rewritten
    # the same bytes under another name still hit: the key is the content, not the path
    copy = tmp_path / "copy.txt"
    copy.write_bytes(small_corpus.read_bytes())
    assert prepare(_prep_spec(copy), tok, cache) == (first, True)
    # one byte changed: a miss, a new folder
    data = bytearray(small_corpus.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    copy.write_bytes(bytes(data))
    changed, hit3 = prepare(_prep_spec(copy), tok, cache)
    assert not hit3 and changed != first
    # cleaning parameters are part of the key too
    assert prepare(_prep_spec(small_corpus, dedup=True), tok, cache)[0] not in (first, changed)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


def test_prepare_killed_midway_leaves_nothing_valid(small_corpus: Path, tmp_path: Path) -> None:
    """SIGKILL while half the files are written: no folder under the key's name; a rerun
    removes the leftover and gives the same result as an uninterrupted preparation."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from jupyter_llm.train.data import build_tokenizer, cache_key, prepare

    spec = _prep_spec(small_corpus)
    tok = build_tokenizer(spec, tmp_path / "tok")
    cache = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path; from transformers import AutoTokenizer\n"
        "from jupyter_llm.spec import Spec; from jupyter_llm.train.data import prepare\n"
        f"spec = Spec.from_yaml({spec.to_yaml()!r})\n"
        f"prepare(spec, AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r}), Path({str(cache)!r}))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=dict(os.environ, JUPYTER_LLM_FAULT="stall_prepare")
    )
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*.tmp-*/train.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(cache.glob(".*.tmp-*/train.bin")), "preparation never got half way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    key = cache_key(spec, tok)
    assert not (cache / key).exists()  # nothing that looks valid
    path, hit = prepare(spec, tok, cache)
    assert not hit and path == cache / key
    assert not list(cache.glob(".*.tmp-*"))  # the dead writer's leftovers are gone
    ref, _ = prepare(spec, tok, tmp_path / "clean-cache")
    for f in ("train.bin", "val.bin"):
        assert (path / f).read_bytes() == (ref / f).read_bytes()


def test_cleaning_steps_and_stats(tmp_path: Path) -> None:
    import json as _json

    from jupyter_llm.train.data import build_tokenizer, prepare

    f = tmp_path / "docs.jsonl"
    docs = [
        "ﬁne café",
        "ﬁne café",
        "tiny",
        "ctrl\x07chars\x1b here",
        "a" * 500,
        "keep this one",
        "keep this one",
    ]
    f.write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    spec = _prep_spec(f, normalize="NFKC", strip_control=True, min_chars=5, max_chars=100, dedup=True)
    tok = build_tokenizer(spec, tmp_path / "tok")
    path, _ = prepare(spec, tok, tmp_path / "cache")
    index = _json.loads((path / "index.json").read_text())
    assert index["stats"] == {"documents_read": 7, "documents": 3, "duplicates": 2, "dropped_length": 2}
    assert sum(index["length_histogram"].values()) == 3
    ids = np.concatenate([np.fromfile(path / f"{s}.bin", dtype=index["dtype"]) for s in ("train", "val")])
    text = tok.decode(ids.tolist(), skip_special_tokens=True)
    assert "fine café" in text and "ﬁ" not in text  # NFKC folded the ligature
    assert "ctrlchars here" in text and "\x07" not in text
    assert text.count("keep this one") == 1 and "tiny" not in text and "aaaa" not in text


def test_one_cleaning_path_for_text_and_pairs() -> None:
    """Text documents and prompt/response pairs go through the same rules (data.clean): the
    same texts, once as documents and once as responses, are kept and dropped alike."""
    from collections import Counter

    from jupyter_llm.spec import CleanSpec
    from jupyter_llm.train.data import Cleaner

    texts = ["\ufb01ne caf\u00e9", "\ufb01ne caf\u00e9", "tiny", "", "a" * 500, "keep this one"]
    clean = CleanSpec(normalize="NFKC", min_chars=0, max_chars=100, dedup=True)
    outcomes = []
    for wrap in (lambda t: [t], lambda t: ["", t]):  # a document; a pair with an empty prompt
        stats: Counter[str] = Counter()
        cleaner = Cleaner(clean, stats)
        kept = []
        for t in texts:
            parts = [cleaner.text(p) for p in wrap(t)]
            if cleaner.keep(sum(map(len, parts)), "|".join(parts).encode()):
                kept.append(parts[-1])
        outcomes.append((kept, dict(stats)))
    assert outcomes[0] == outcomes[1]
    # min_chars 0 still drops the empty document; NFKC folded the ligature before the hash
    assert outcomes[0] == (["fine café", "tiny", "keep this one"], {"duplicates": 1, "dropped_length": 2})


def test_pairs_pack_with_a_response_only_loss_mask(tmp_path: Path) -> None:
    """Prompt/response pairs: tokens are prompt + response + EOS; the mask beside them is 0 on
    prompts and 1 on responses (and their EOS), through the validation split and the worker's
    block reader."""
    from jupyter_llm.train.data import Blocks, DataError, build_tokenizer, tokenize_to_files

    pairs = [{"prompt": f"q{i}: what is {i}+{i}?", "response": f" {2 * i}"} for i in range(300)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "char"}},
                           "data": {"train": str(f), "format": "pairs", "val_fraction": 0.2, "block_size": 16}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    assert index["loss_mask"] is True
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ref_ids = [t for p in pairs for t in [*enc(p["prompt"]), *enc(p["response"]), tok.eos_token_id]]
    ref_mask = [m for p in pairs for m in [0] * len(enc(p["prompt"])) + [1] * (len(enc(p["response"])) + 1)]
    d = tmp_path / "data"
    ids = np.concatenate([np.fromfile(d / f"{s}.bin", dtype=index["dtype"]) for s in ("train", "val")])
    mask = np.concatenate([np.fromfile(d / f"{s}.mask", dtype=np.uint8) for s in ("train", "val")])
    assert ids.tolist() == ref_ids and mask.tolist() == ref_mask
    assert (
        index["splits"]["val"]["tokens"]
        == int(len(ref_ids) * 0.2)
        == len(np.fromfile(d / "val.mask", np.uint8))
    )
    blocks = Blocks(d / "train.bin", index["dtype"], 16, seed=3)
    got, got_mask = blocks.batch(5, 4, True), blocks.mask_batch(5, 4, True)
    assert got_mask is not None and got.shape == got_mask.shape == (4, 16)
    for row, m in zip(got, got_mask, strict=True):
        # each masked position is a response character, EOS or digit/space; prompts never are
        chars = [tok.convert_ids_to_tokens(int(t)) for t in row[m]]
        assert all(c == tok.eos_token or c.isdigit() or c == " " for c in chars)
        assert not any(c == "?" for c in chars)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'response' \(data.response_field\)"):
        tokenize_to_files(Spec.from_dict({"tokenizer": {"train": {"kind": "char"}},
                                          "data": {"train": str(bad), "format": "pairs"}}), tok, tmp_path / "x")  # fmt: skip


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_messages_count_assistant_turns_only(tmp_path: Path) -> None:
    """Chat lines rendered by the chat template: the mask covers exactly the assistant turns."""
    from transformers import AutoTokenizer

    from jupyter_llm.train.data import DataError, build_tokenizer, tokenize_to_files

    convs = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {i} and 1."},
                      {"role": "assistant", "content": f"{i + 1}."}, {"role": "user", "content": "Thanks!"},
                      {"role": "assistant", "content": "Welcome."}]}
        for i in range(50)
    ]  # fmt: skip
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in convs))
    spec = Spec.from_dict({"tokenizer": {"train": {"kind": "char"}, "chat_template": CHAT_TEMPLATE},
                           "data": {"train": str(f), "format": "chat", "validation": str(f)}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == CHAT_TEMPLATE  # saved with it
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=index["dtype"])
    mask = np.fromfile(tmp_path / "data" / "train.mask", dtype=np.uint8).astype(bool)
    eos = tok.eos_token_id
    counted = tok.decode(ids[mask & (ids != eos)].tolist())
    assert counted == "".join(f"{i + 1}.\nWelcome.\n" for i in range(50))
    assert tok.decode(ids[~mask].tolist()).count("<user>Thanks!\n<assistant>") == 50
    assert int((ids[mask] == eos).sum()) == 50 and not (ids[~mask] == eos).any()
    assert index["stats"]["documents"] == 100 and index["splits"]["val"]["tokens"] == len(ids)  # train + val
    f.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"chat.jsonl:1: no list of \{role, content\} messages"):
        tokenize_to_files(spec, tok, tmp_path / "bad")


def test_masked_lm_blocks_never_cross_documents(tmp_path: Path) -> None:
    """Masked-LM data keeps document ends: every block is one document's chunk (the last one
    padded), the chunks of a document give back its tokens, across the validation split."""
    from jupyter_llm.train.data import Blocks, build_tokenizer, tokenize_to_files

    docs = [("word " * (3 + 7 * i % 23)).strip() + f" doc{i}" for i in range(60)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = Spec.from_dict({"model": {"task": "masked-lm"}, "tokenizer": {"train": {"kind": "wordpiece", "vocab_size": 200}},
                           "data": {"train": str(f), "val_fraction": 0.25}})  # fmt: skip
    tok = build_tokenizer(spec, tmp_path / "tok")
    index = tokenize_to_files(spec, tok, tmp_path / "data")
    d = tmp_path / "data"
    enc = [tok(x, add_special_tokens=False)["input_ids"] for x in docs]
    got: list[list[int]] = []
    for split in ("train", "val"):
        b = Blocks(d / f"{split}.bin", index["dtype"], 8, seed=1, pad_id=tok.pad_token_id)
        assert b.n > 0
        for i in range(b.n):
            row, n = b.block(i).tolist(), int(b.lens[i])  # type: ignore[index]
            assert tok.sep_token_id not in row and all(t == tok.pad_token_id for t in row[n:])
            assert 0 < n <= 8 and tok.pad_token_id not in row[:n]
            prev = int(b.starts[i - 1]) if i else -99  # type: ignore[index]
            if i and int(b.lens[i - 1]) == 8 and int(b.starts[i]) == prev + 8:  # type: ignore[index]
                got[-1] += row[:n]  # the same document continues
            else:
                got.append(row[:n])
        assert b.lengths(0, 3, False).tolist() == [int(x) for x in b.lens[:3]]  # type: ignore[index]
    # the document cut by the split comes back in two parts; every other one whole
    flat = [t for g in got for t in g]
    assert flat == [t for e in enc for t in e]
    assert len(got) in (len(docs), len(docs) + 1)


def test_a_bf16_checkpoint_loads_in_bf16(tmp_path: Path, small_corpus: Path) -> None:
    """build_model loads a bf16 checkpoint as bf16 (model.dtype auto), and as fp32 only when
    the spec asks for it."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.model import build_model

    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=16, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    )
    base = {"data": {"train": str(small_corpus), "block_size": 16}, "tokenizer": {"train": {"kind": "char"}},
            "model": {"pretrained": str(tmp_path / "bf16")}}  # fmt: skip
    model = build_model(Spec.from_dict(base), tok)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = build_model(Spec.from_dict(base, ["model.dtype=fp32", "train.precision=fp32"]), tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_streamed_export_shards_reload_as_the_model(tmp_path: Path) -> None:
    """The ZeRO-3 export's writer: tensors streamed into several safetensors shards (a small
    shard size here) with their index load back with from_pretrained as the same model, tied
    embeddings included."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from jupyter_llm.train.loop import ShardWriter

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=32)).eval()
    out = tmp_path / "export"
    shards = ShardWriter(out, shard_bytes=16 * 1024)
    for key, value in model.state_dict().items():
        if key != "lm_head.weight":  # tied to the embeddings: written once, as the gather does
            shards.add(key, value.clone())
    shards.close()
    model.config.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_estimate_trains_only_the_lora_adapters(tmp_path: Path, corpus: Path) -> None:
    """The fit's shape of a LoRA spec: every parameter, but only the adapters trainable (an
    estimate that counted the base as trainable was 2.2x the measured peak of a 478 M model)."""
    from transformers import GPT2Config

    from jupyter_llm.spec import Spec
    from jupyter_llm.train.model import meta_shape

    GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=80).save_pretrained(tmp_path)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}
    spec = Spec.from_dict(
        {"model": {"pretrained": str(tmp_path), "lora": lora}, "data": {"train": str(corpus)}}
    )
    shape = meta_shape(spec, 80)
    assert shape["trainable_params"] == 3 * 8 * (64 + 3 * 64)  # r x (in + out) of each c_attn
    assert shape["params"] == shape["trainable_params"] + meta_shape(Spec.from_dict(
        {"model": {"pretrained": str(tmp_path)}, "data": {"train": str(corpus)}}), 80)["params"]  # fmt: skip


LOAD_PARTITIONED = """
import os, sys, torch, deepspeed, transformers as tf
from safetensors.torch import load_file
from jupyter_llm.train import model as M
deepspeed.init_distributed()
folder = sys.argv[1]
with M.zero3_init({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
    m = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder))
    streamed = M.load_partitioned(m, folder)
params = dict(m.named_parameters())
ref = load_file(os.path.join(folder, "model.safetensors"))
with deepspeed.zero.GatheredParameters(list(params.values())):
    equal = all(torch.equal(p.data, ref[n]) for n, p in params.items())
print(streamed, all(hasattr(p, "ds_id") for p in params.values()), equal)
"""


@pytest.mark.deepspeed
def test_a_checkpoint_streams_into_a_partitioned_model(tmp_path: Path) -> None:
    """ZeRO-3 from a saved GPT-2: the module-at-a-time loader takes it (no fallback to
    Transformers' whole-dict load), the model stays partitioned, every weight equals the file's."""
    import os
    import subprocess
    import sys

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=70)).save_pretrained(tmp_path)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", LOAD_PARTITIONED, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "True", "True"], out.stdout


def test_fused_gelu_replaces_gelu_new_with_the_same_function() -> None:
    """GPT-2's `gelu_new` modules become PyTorch's fused tanh GELU: same outputs (to rounding),
    the config untouched, so the export still names the model's own activation."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from jupyter_llm.train.model import fused_gelu

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16)).eval()
    fused = copy.deepcopy(model)
    assert fused_gelu(fused) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, GELUTanh) for m in fused.modules()) == 2
    assert fused.config.activation_function == "gelu_new"
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fused(ids).logits, atol=1e-5)
    assert fused_gelu(fused) == 0  # nothing left to replace


def test_repeated_blocks_are_a_models_layers_whatever_wraps_them() -> None:
    """Regional compilation finds the layers: GPT-2's, BERT's and Llama's blocks, the same under
    peft's LoRA wrapper; a list inside a found block is left to it; a model that repeats nothing
    (or a list of mixed classes) gives none, so the worker compiles it whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from jupyter_llm.train.model import repeated_blocks

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=32, vocab_size=50, n_positions=16))
    assert repeated_blocks(gpt) == list(gpt.transformer.h)
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=50))  # fmt: skip
    assert repeated_blocks(bert) == list(bert.bert.encoder.layer)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=50))  # fmt: skip
    assert repeated_blocks(llama) == list(llama.model.layers)
    lora = get_peft_model(gpt, LoraConfig(r=4, target_modules=["c_attn"]))
    assert [type(b).__name__ for b in repeated_blocks(lora)] == ["GPT2Block"] * 3

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    moe = torch.nn.ModuleList(Block() for _ in range(2))
    assert repeated_blocks(moe) == list(moe)  # not the experts
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))) == []
    assert repeated_blocks(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])) == []
    assert repeated_blocks(torch.nn.ModuleList([torch.nn.Linear(4, 4)])) == []


def test_finished_ranks_end_the_watch_and_are_not_failures(tmp_path: Path) -> None:
    """A rank that recorded `done` and exited is no failure; the job is over when every rank of
    the attempt is done and gone (a running rank, a rank not done, another attempt: not over)."""
    import subprocess

    from jupyter_llm.files import write_json_atomic
    from jupyter_llm.launcher.watch import first_dead_rank, rank_records, ranks_done

    def record(rank: int, pid: int, done: bool, attempt: int = 1) -> None:
        write_json_atomic(tmp_path / "ranks" / f"rank{rank}.json",
                          {"rank": rank, "pid": pid, "create_time": None, "attempt": attempt, "done": done})  # fmt: skip

    (tmp_path / "ranks").mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        record(0, gone.pid, True)
        record(1, alive.pid, True)
        assert not ranks_done(rank_records(tmp_path, 1), 2)  # rank 1 still runs
        assert first_dead_rank(tmp_path, 1) is None  # rank 0 finished: not the first failure
        alive.kill()
        alive.wait()
        assert ranks_done(rank_records(tmp_path, 1), 2)
        assert not ranks_done(rank_records(tmp_path, 1), 3)  # rank 2 never recorded
        assert not ranks_done(rank_records(tmp_path, 2), 2)  # another attempt's records
        record(1, alive.pid, False)
        assert not ranks_done(rank_records(tmp_path, 1), 2)
        assert first_dead_rank(tmp_path, 1)["rank"] == 1  # gone without finishing
    finally:
        alive.kill()


def test_kill_group_does_not_wait_for_zombies() -> None:
    """An unreaped group leader is a zombie: nothing of the group runs, so kill_group returns
    at once rather than at its deadline."""
    import subprocess
    import time

    from jupyter_llm.launcher.local import group_running, kill_group

    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert group_running(p.pid)
    t0 = time.monotonic()
    kill_group(p.pid, wait_s=30)
    assert time.monotonic() - t0 < 15 and not group_running(p.pid)
    assert p.wait(5) == -9


RANK_PROBE = r"""
import json, os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
        "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
if mode != "ok":  # (before the record: a SIGTERM may follow it at once)
    signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join(out, "term%s" % os.environ["RANK"]), "w"), sys.exit(0)))
with open(os.path.join(out, "rank%s.json.tmp" % os.environ["RANK"]), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys} | {"pid": os.getpid()}, f)
os.rename(os.path.join(out, "rank%s.json.tmp" % os.environ["RANK"]), os.path.join(out, "rank%s.json" % os.environ["RANK"]))
if mode == "fail" and os.environ["RANK"] == "3":
    while not os.path.exists(os.path.join(out, "rank2.json")):  # rank 2 is up: then fail
        time.sleep(0.01)
    sys.exit(7)
if mode != "ok":
    time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["ok", "fail", "signal"])
def test_the_ranks_launcher_sets_each_rank_and_stops_them_together(tmp_path: Path, mode: str) -> None:
    """launcher.ranks: DeepSpeed's per-node environment per rank (real processes); a failing rank
    stops the others and gives its exit code; SIGTERM to the launcher reaches every rank."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "probe.py").write_text(RANK_PROBE)
    argv = [sys.executable, "-m", "jupyter_llm.launcher.ranks", "--ranks=2", "--first-rank=2", "--world-size=4",
            "--node-rank=1", "--nodes=2", "--master-addr=127.0.0.9", "--master-port=29999", "--devices=5,3",
            "probe", str(tmp_path), mode]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    if mode == "signal":
        wait_for(lambda: len(list(tmp_path.glob("rank*.json"))) == 2, 60, "both ranks started")
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    rc = p.returncode
    ranks = {int(f.stem[4:]): json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")}
    assert ranks[2] | {"pid": 0} == {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                                     "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "127.0.0.9",
                                     "MASTER_PORT": "29999", "CUDA_VISIBLE_DEVICES": "5,3", "pid": 0}  # fmt: skip
    assert ranks[3]["RANK"] == "3" and ranks[3]["LOCAL_RANK"] == "1"
    assert rc == {"ok": 0, "fail": 7, "signal": 1}[mode]
    if mode == "fail":  # rank 2 was asked to stop (SIGTERM) once rank 3 failed, not left to its sleep
        assert (tmp_path / "term2").exists() and time.monotonic() - t0 < 30
        # in the words watch.diagnose reads the failed rank's exit code from
        assert f"rank 3 (pid {ranks[3]['pid']}) exits with return code = 7" in out
    if mode == "signal":
        assert (tmp_path / "term2").exists() and (tmp_path / "term3").exists()
    for r in ranks.values():
        assert not psutil.pid_exists(r["pid"]) or psutil.Process(r["pid"]).status() == psutil.STATUS_ZOMBIE
