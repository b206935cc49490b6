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
