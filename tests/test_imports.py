"""`import jupyter_llm` stays light: no torch, deepspeed or transformers in the caller."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "deepspeed", "transformers", "tokenizers", "numpy"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_is_light() -> None:
    mods = _modules_after("import jupyter_llm")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_api_surface_is_light(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Validating a spec, creating a run and listing runs never import torch."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 100)
    code = (
        "import jupyter_llm, os\n"
        f"os.environ['JUPYTER_LLM_HOME'] = {str(tmp_path)!r}\n"
        f"spec = jupyter_llm.Spec.from_dict({{'data': {{'train': {str(corpus)!r}}}}})\n"
        "run = jupyter_llm.RunStore().create(spec)\n"
        "assert jupyter_llm.runs()[0].state == 'created'\n"
        "from jupyter_llm import cli\n"
        "assert callable(jupyter_llm.launch) and jupyter_llm.launch.__name__ == 'launch'\n"
        "assert jupyter_llm.runs.Run is jupyter_llm.Run\n"
    )
    mods = _modules_after(code)
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_a_rank_imports_deepspeed_without_mlflow_and_from_bytecode() -> None:
    """What every rank imports at its start costs what it must: DeepSpeed (imported the rank's way,
    `train.deps.import_deepspeed`) without the MLflow and pandas its autotuner would pull in (3.7 s
    a rank, measured), `import mlflow` still working after it; and Transformers' modules found as
    bytecode after a first import (PYTHONDONTWRITEBYTECODE, set on our machines, with pip's
    --no-compile had every process compile torch, DeepSpeed and Transformers from source: 6 s of
    a rank's 12 s start-up; `make` unexports it — run pytest through make or without it)."""
    code = (
        "import importlib.util, sys\n"
        "from jupyter_llm.train.deps import import_deepspeed\n"
        "import_deepspeed()\n"
        "import transformers.models.gpt2.modeling_gpt2 as m\n"
        "print('mlflow' in sys.modules, 'pandas' in sys.modules)\n"
        "import mlflow\n"
        "print(__import__('os').path.exists(importlib.util.cache_from_source(m.__file__)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, cached = out.stdout.split()[-3:-1], out.stdout.split()[-1]
    assert loaded == ["False", "False"], out.stdout
    assert cached == "True", (
        "Transformers' modules are compiled at every import: PYTHONDONTWRITEBYTECODE is set"
    )
