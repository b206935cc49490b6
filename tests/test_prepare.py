"""Data preparation as its own detached job: `%llm_prepare`, `jupyter-llm prepare`,
`jupyter_llm.prepare`. Real supervisor and job processes; no DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from IPython.core.error import UsageError

import jupyter_llm
from conftest import tiny_spec, wait_for
from jupyter_llm.runs import RunStore


def _ready(run: Any) -> dict[str, Any]:
    return next(e for e in run.events() if e["event"] == "data_ready")


def test_prepare_magic_is_detached_and_the_api_hits_its_cache(ip: Any, corpus: Path) -> None:
    body = yaml.safe_dump(tiny_spec(corpus, tokenizer={"train": {"kind": "bpe", "vocab_size": 400}}))
    t0 = time.monotonic()
    run = ip.run_cell_magic("llm_prepare", "shakes", body)
    assert time.monotonic() - t0 < 5  # returns with the handle; the job works elsewhere
    assert run.name == "shakes" and run.status()["job"] == "prepare"
    assert run.wait(timeout=120) == "completed", run.status()
    first = _ready(run)
    assert first["cached"] is False and first["documents"] == 1
    assert first["tokens"]["train"]["tokens"] > 0 and first["tokens"]["val"]["tokens"] > 0
    data = Path(json.loads((run.path / "data.json").read_text())["path"])
    index = json.loads((data / "index.json").read_text())
    assert index["splits"] == first["tokens"] and index["dtype"] == "uint16"
    assert (run.path / "tokenizer" / "tokenizer.json").is_file()
    assert '"length_histogram"' in (run.path / "logs" / "prepare.log").read_text()  # stats shown
    prog = json.loads((run.path / "progress.json").read_text())
    assert prog["phase"] == "done" and prog["bytes_done"] == prog["bytes_total"] == corpus.stat().st_size
    assert prog["tokens"] == sum(v["tokens"] for v in index["splits"].values())
    from jupyter_llm.display import run_html
    from jupyter_llm.summary import run_text

    view = run_html(run)
    assert (
        "(prepare)" in view and "train tokens" in view and f"{index['splits']['train']['tokens']:,}" in view
    )
    assert "&lt; 262,144" in view  # the one document (200,000 chars) in its length bin
    assert "documents 1" in run_text(run)
    # the same spec again, through the Python API: the cache answers, same folder
    again = jupyter_llm.prepare(yaml.safe_load(body), wait=True, timeout=120)
    assert again.state == "completed" and _ready(again)["cached"] is True
    assert json.loads((again.path / "data.json").read_text())["path"] == str(data)
    with pytest.raises(UsageError, match="give a spec: %%llm_prepare"):
        ip.run_line_magic("llm_prepare", "")


def test_prepare_cli_reports_bad_data_by_file(tmp_path: Path, corpus: Path) -> None:
    bad = tmp_path / "rows.csv"
    bad.write_text("title,body\nx,y\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(corpus, data={"train": [str(bad)]})))
    out = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "prepare", str(spec), "--wait"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "preparation failed: DataError:" in out.stderr and "rows.csv: no column 'text'" in out.stderr
    run = RunStore().get(out.stdout.strip())
    assert run.state == "failed" and "['title', 'body']" in run.status()["error"]


def test_prepare_stopped_midway_leaves_no_valid_data(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop during packing: the job ends `stopped`, its temporary folder is gone and no
    folder under a cache key exists; a rerun then prepares the complete data."""
    monkeypatch.setenv("JUPYTER_LLM_FAULT", "stall_prepare")  # stalls after train.bin is written
    spec = tiny_spec(corpus)
    run = jupyter_llm.prepare(spec)
    cache = run.path.parent / ".cache" / "data"
    wait_for(lambda: any(cache.glob(".*.tmp-*/train.bin")), 60, "the packing to start")
    assert run.stop(wait=True, timeout=60) == "stopped"
    assert list(cache.iterdir()) == []  # nothing that looks valid, no leftovers
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    again = jupyter_llm.prepare(spec, wait=True, timeout=120)
    assert again.state == "completed" and _ready(again)["cached"] is False
    assert [p.name for p in cache.iterdir()] == [Path(_ready(again)["path"]).name]
    assert os.path.isfile(Path(_ready(again)["path"]) / "index.json")


def test_notebook_transform_travels_to_the_job(ip: Any, tmp_path: Path, corpus: Path) -> None:
    """A function defined in the notebook (by value, with cloudpickle) shapes the documents in
    the detached job: dropped, rewritten and multiplied exactly as it says, token for token."""
    paras = [p for p in corpus.read_text().split("\n\n") if p.strip()][:200]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    ip.run_cell(
        "import re\n"
        "def shout(text):\n"
        "    if 'Citizen' in text:\n"
        "        return None\n"
        "    loud = re.sub(r'\\s+', ' ', text.upper())\n"
        "    return [loud, loud[::-1]] if 'ROME' in loud else loud\n"
    )
    shout = ip.user_ns["shout"]
    assert shout.__module__ == "__main__"  # what a notebook gives: not importable by the job
    ip.user_ns["spec"] = tiny_spec(corpus, data={"train": [str(rows)], "val_fraction": 0.1, "block_size": 32})
    run = ip.run_line_magic("llm_prepare", "spec --transform shout --wait")
    assert run.state == "completed", run.status()
    assert len(run.manifest()["transform_sha256"]) == 64  # recorded with the run
    ready = _ready(run)
    expected = [
        d
        for p in paras
        for d in ([] if shout(p) is None else [shout(p)] if isinstance(shout(p), str) else shout(p))
    ]
    assert ready["dropped_transform"] == sum("Citizen" in p for p in paras) > 0
    assert ready["documents"] == len(expected) > len(paras) - ready["dropped_transform"]  # some doubled
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.path / "tokenizer")
    assert not any(
        c.islower() for c in tok.get_vocab() if len(c) == 1
    )  # the tokenizer was trained on the transformed text
    data = Path(ready["path"])
    packed = np.concatenate([np.fromfile(data / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    reference = [
        t for d in expected for t in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ]
    assert packed.tolist() == reference
    # a transform that raises fails the job with the reason; a bad name is a usage error
    ip.run_cell("def broken(text):\n    return 1 / 0\n")
    bad = ip.run_line_magic("llm_prepare", "spec --transform broken --wait")
    assert bad.state == "failed" and "the data transform raised ZeroDivisionError" in bad.status()["error"]
    for arg, msg in (("nope", "no such variable"), ("spec", "not a function")):
        with pytest.raises(UsageError, match=msg):
            ip.run_line_magic("llm_prepare", f"spec --transform {arg}")
