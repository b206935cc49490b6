"""The built wheel: the server extension and the prebuilt JupyterLab extension are enabled after
a plain `pip install` in a fresh venv; the Python and JavaScript versions are equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jupyter_llm
from conftest import REPO

TORCH = os.environ.get("JUPYTER_LLM_TORCH", "torch==2.13.0")  # the CPU build, as the Makefile pins it


def test_python_and_javascript_versions_are_equal() -> None:
    package = json.loads((REPO / "labextension" / "package.json").read_text())
    assert package["version"] == jupyter_llm.__version__


@pytest.mark.deepspeed  # slow: a wheel build and a fresh venv with every dependency
def test_wheel_in_a_fresh_venv_enables_both_extensions(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=900)  # fmt: skip
    [wheel] = wheels.glob("jupyter_llm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "DS_BUILD_OPS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", TORCH, str(wheel)], check=True, env=env, timeout=1200
    )
    run = {**env, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    labext = subprocess.run([str(venv / "bin" / "jupyter"), "labextension", "list"], capture_output=True,
                            text=True, env=run, check=True)  # fmt: skip
    text = labext.stdout + labext.stderr
    assert "jupyter-llm v" in text and "enabled" in text.split("jupyter-llm v", 1)[1].splitlines()[0], text
    assert "OK" in text.split("jupyter-llm v", 1)[1].splitlines()[0], text
    server = subprocess.run([str(venv / "bin" / "jupyter"), "server", "extension", "list"], capture_output=True,
                            text=True, env=run, check=True)  # fmt: skip
    text = server.stdout + server.stderr
    assert "jupyter_llm enabled" in text.replace("\x1b[32m", "").replace("\x1b[0m", ""), text
    assert f"jupyter_llm {jupyter_llm.__version__} OK" in text.replace("\x1b[32m", "").replace(
        "\x1b[0m", ""
    ), text
