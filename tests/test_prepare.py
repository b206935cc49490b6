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

import pytest
import yaml
from IPython.core.error import UsageError

import jupyter_llm
from conftest import tiny_spec
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
    deadline = time.monotonic() + 60
    while not any(cache.glob(".*.tmp-*/train.bin")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(cache.glob(".*.tmp-*/train.bin")), run.logs()
    assert run.stop(wait=True, timeout=60) == "stopped"
    assert list(cache.iterdir()) == []  # nothing that looks valid, no leftovers
    monkeypatch.delenv("JUPYTER_LLM_FAULT")
    again = jupyter_llm.prepare(spec, wait=True, timeout=120)
    assert again.state == "completed" and _ready(again)["cached"] is False
    assert [p.name for p in cache.iterdir()] == [Path(_ready(again)["path"]).name]
    assert os.path.isfile(Path(_ready(again)["path"]) / "index.json")
