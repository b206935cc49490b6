"""The built wheel: the server extension and the prebuilt JupyterLab extension are enabled after
a plain `pip install` in a fresh venv (no test extras), the shipped pipeline (prepare → train →
evaluate on a real kernel of that venv) runs from it, and a report_to whose client is not
installed is refused at launch naming the extra; the Python and JavaScript versions are equal."""

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
def test_wheel_in_a_fresh_venv_enables_both_extensions_and_runs_the_pipeline(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=900)  # fmt: skip
    [wheel] = wheels.glob("jupyter_llm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # its own DeepSpeed builds its ops in its own folder: in the suite's, the next rank of the
    # suite's venv would find them built from other sources and rebuild them (25 s each)
    env = {**os.environ, "DS_BUILD_OPS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}  # fmt: skip
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    subprocess.run(
        # --no-compile: the modules the test imports are compiled as they are (a third of pip's time
        # went to byte-compiling every file of every package)
        [str(venv / "bin" / "pip"), "install", "-q", "--no-compile", TORCH, str(wheel)],
        check=True,
        env=env,
        timeout=1200,
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

    # the pipeline and a training run, with nothing but what the wheel's own dependencies bring
    home = tmp_path / "home"
    bin_ = str(venv / "bin")
    plain = {**run, "PATH": f"{bin_}:{os.environ['PATH']}", "JUPYTER_LLM_HOME": str(home), "HF_HUB_OFFLINE": "1",
             "JUPYTER_LLM_CALLER_CWD": str(tmp_path)}  # fmt: skip
    plain.pop("PYTHONPATH", None)
    out = tmp_path / "pipe"
    pipe = subprocess.run(
        [f"{bin_}/jupyter-llm", "pipeline", "run", str(REPO / "notebooks" / "pipeline.yaml"), "--out", str(out),
         "-p", "max_steps=10", "-p", "ranks=1", "-p", "max_new_tokens=4"],
        capture_output=True, text=True, env=plain, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert pipe.returncode == 0, pipe.stdout[-3000:] + pipe.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][s]["state"] for s in ("prepare", "train", "evaluate")] == ["completed"] * 3
    train_run = manifest["stages"]["train"]["outputs"]["train_run"]
    [run_dir] = (home / "runs").glob(f"{train_run}*")
    record = json.loads((run_dir / "manifest.json").read_text())
    assert record["attempts"][0]["command"][0].startswith(
        f"{bin_}/python"
    )  # the kernel and its job: the venv's
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "final" / "README.md").is_file()
    # report_to a target whose client the plain install lacks: refused before anything starts
    spec = tmp_path / "spec.yaml"
    spec.write_text((run_dir / "spec.yaml").read_text() + "report_to: [mlflow]\n")
    refused = subprocess.run([f"{bin_}/jupyter-llm", "train", str(spec)], capture_output=True, text=True,
                             env=plain, timeout=120)  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "report_to mlflow needs mlflow: pip install 'jupyter-llm[mlflow]'" in refused.stderr
