"""The package's layers hold (pyproject.toml's import-linter contract, also run by `make lint`),
a cycle added on purpose breaks them, and no module imports another module's private name."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "jupyter_llm"
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(
        PKG, tmp_path / "jupyter_llm", ignore=shutil.ignore_patterns("labextension", "__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    ok = _lint(tree)
    assert ok.returncode == 0 and "1 kept, 0 broken" in ok.stdout, ok.stdout + ok.stderr
    # the run-folder model reaching up into the widgets, inside a function as the old cycle did
    folder = tree / "jupyter_llm" / "folder.py"
    folder.write_text(
        folder.read_text()
        + "\n\ndef _dash(run):\n    from .widgets import Dashboard\n\n    return Dashboard(run)\n"
    )
    bad = _lint(tree)
    assert (
        bad.returncode != 0
        and "jupyter_llm.folder is not allowed to import jupyter_llm.widgets" in bad.stdout
    )


def test_no_module_imports_a_private_name_of_another() -> None:
    found = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("jupyter_llm")
            ):
                found += [
                    f"{f.relative_to(ROOT)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []
