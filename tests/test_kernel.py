"""A real IPython kernel launches a run, is restarted mid-run, and a new kernel reattaches."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.manager import KernelManager

from conftest import tiny_spec, wait_for
from jupyter_llm.runs import RunStore

pytestmark = pytest.mark.deepspeed


def execute(kc: Any, code: str, timeout: float = 120) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Run `code`; return (seconds until the reply, iopub messages until idle, reply content)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    elapsed = time.perf_counter() - t0
    msgs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") == msg_id:
            msgs.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
    return elapsed, msgs, reply["content"]


def value(kc: Any, expr: str) -> Any:
    _, msgs, reply = execute(kc, f"print(repr({expr}))")
    assert reply["status"] == "ok", reply
    out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    return eval(out.strip())


def start_kernel(env: dict[str, str]) -> tuple[KernelManager, Any]:
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=env["JUPYTER_LLM_HOME"])
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def test_launch_restart_reattach(corpus: Path, tmp_path: Path) -> None:
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    spec = tiny_spec(corpus, train={"max_steps": 120, "log_every": 5, "eval_every": 40, "save_every": 40})
    km, kc = start_kernel(env)
    try:
        execute(kc, "%load_ext jupyter_llm")
        elapsed, msgs, reply = execute(kc, "%%llm_train kernel-run\n" + yaml.safe_dump(spec))
        assert reply["status"] == "ok", reply
        assert elapsed < 1.0, f"%%llm_train took {elapsed:.2f} s"
        # the run shows as its live dashboard: a widget view (text fallback names the run)
        shown = [m for m in msgs if m["msg_type"] == "display_data"]
        assert shown and "kernel-run" in shown[0]["content"]["data"]["text/plain"]
        assert "application/vnd.jupyter.widget-view+json" in shown[0]["content"]["data"]
        # the kernel never imported torch, so it cannot have initialised CUDA
        assert (
            value(
                kc,
                "sorted(m for m in __import__('sys').modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers'))",
            )
            == []
        )
        run = RunStore(Path(env["JUPYTER_LLM_HOME"]) / "runs").get("kernel-run")
        # the dashboard's background reader changes widget values while the run goes on:
        # widget state updates (comm messages) arrive after the cell has finished
        deadline = time.monotonic() + 300
        updated: set[str] = set()
        while not {"value", "x"} <= updated and time.monotonic() < deadline:
            m = kc.get_iopub_msg(timeout=300)
            if m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update":
                updated |= set(m["content"]["data"]["state"])
        assert {"value", "x"} <= updated, updated  # the progress bar moved and a curve gained points
        # wait until training is under way, then restart the kernel (SIGKILL of its process group)
        wait_for(lambda: any("loss" in m for m in run.metrics()), 300, "a training step")
        assert run.state == "running"
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert run.state == "running"  # the job outlived the kernel

        execute(kc, "%load_ext jupyter_llm")
        _, _, reply = execute(kc, "r = %llm_attach kernel-run")
        assert reply["status"] == "ok"
        # shown, the reattached run rebuilds its dashboard from the folder: every point so far
        _, msgs, reply = execute(kc, "%llm_attach kernel-run")
        shown = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
        assert reply["status"] == "ok" and shown and "application/vnd.jupyter.widget-view+json" in shown[0]
        execute(kc, "from jupyter_llm.widgets import Dashboard")
        drawn = value(kc, "Dashboard(r).views[0].loss.x.tolist()")
        assert drawn and drawn == [float(m["step"]) for m in run.metrics() if "loss" in m][: len(drawn)]
        assert value(kc, "r.state") in ("running", "completed")
        assert value(kc, "r.wait(600)") == "completed"
        lines = value(kc, "[(m['step'], 'val_loss' in m) for m in r.metrics(dedupe=False)]")
        train_steps = [s for s, is_val in lines if not is_val]
        val_steps = [s for s, is_val in lines if is_val]
        assert train_steps == list(range(5, 121, 5))  # every metric line, none lost or repeated
        assert val_steps == [0, 40, 80, 120]
        assert value(kc, "'torch' in __import__('sys').modules") is False
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_import_alone_registers_the_rich_displays(corpus: Path, tmp_path: Path) -> None:
    """Without `%load_ext`, `import jupyter_llm` in a kernel registers the displays that the
    run-folder layer no longer carries itself: a Run as its live dashboard (a widget), a
    reading handle (`RunFolder`) as HTML."""
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    km, kc = start_kernel(env)
    try:
        spec = tiny_spec(corpus, name="shown")
        _, _, reply = execute(
            kc, f"import jupyter_llm\nr = jupyter_llm.RunStore().create(jupyter_llm.Spec.load({spec!r}))"
        )
        assert reply["status"] == "ok", reply
        _, msgs, _ = execute(kc, "r")
        shown = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
        assert (
            shown
            and "application/vnd.jupyter.widget-view+json" in shown[0]
            and "shown" in shown[0]["text/plain"]
        )
        _, msgs, _ = execute(kc, "from jupyter_llm.folder import RunFolder\nRunFolder(r.path)")
        result = [m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result"]
        assert result and "jupyter-llm-run" in result[0]["text/html"] and "created" in result[0]["text/html"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
