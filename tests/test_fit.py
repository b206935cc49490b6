"""A launch that fits itself: the memory model's choice among ZeRO stages and offloads, the
refusal that says how much is missing and what would fit, and the real thing inside a cgroup
v1 memory limit (the machine's own probe reads the limit; nothing starts when nothing fits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cgroup
import pytest
import yaml

from jupyter_llm import fit
from jupyter_llm.errors import UserError
from jupyter_llm.spec import Spec, zero3_settings

GIB = 2**30
# an 85 M-parameter GPT-2 (12 layers, 768 wide) on a character vocabulary, as the meta device counts it
SHAPE = {"params": 85_896_192, "trainable_params": 85_896_192, "largest_param": 2_359_296,
         "largest_module_params": 2_362_368, "largest_layer_params": 7_087_872, "layer_tensors": 4,
         "hidden_size": 768, "num_layers": 12, "num_heads": 12, "vocab_size": 70}  # fmt: skip


def job(**kw: Any) -> fit.Job:
    base = dict(shape=SHAPE, ranks=1, ranks_per_node=1, compute_bytes=4, micro_batch=4, block=64, vocab=70,
                heads=12, checkpointing=False, zero3=zero3_settings(SHAPE))  # fmt: skip
    return fit.Job(**{**base, **kw})


def res(host_gib: float, nvme: bool = True) -> fit.Resources:
    return fit.Resources(int(host_gib * GIB), "test", (), 100 * GIB if nvme else None, None)


def test_the_cheapest_fitting_configuration_is_chosen() -> None:
    plan = fit.choose(job(), res(16), "auto", "auto", nvme=True)
    assert plan.chosen is not None and (plan.chosen.stage, plan.chosen.offload) == (0, "none")
    # the estimates order as the ZeRO paper's: sharding and NVMe cut what one rank holds
    by = {(c.stage, c.offload): c.need for c in plan.candidates}
    assert by[(3, "nvme")].device < by[(0, "none")].device
    assert by[(3, "nvme")].nvme > 12 * SHAPE["params"]  # the optimizer's states went to the files
    two = fit.choose(job(ranks=2, ranks_per_node=2), res(16), "auto", "none", nvme=True)
    one_rank = fit.need(job(), 3, "none", cuda=False).device
    assert fit.need(job(ranks=2, ranks_per_node=2), 3, "none", cuda=False).device < one_rank
    assert two.chosen is not None and two.chosen.offload == "none"


def test_only_nvme_fits_then_nvme_is_chosen_and_shown() -> None:
    nvme = fit.need(job(), 3, "nvme", cuda=False)
    room = (
        nvme.device + nvme.host + fit.NODE_OVERHEAD
    ) / fit.SAFETY / GIB + 0.05  # just enough for ZeRO-Infinity
    plan = fit.choose(job(), res(room), 3, "auto", nvme=True)
    assert plan.chosen is not None and plan.chosen.offload == "nvme", plan.table()
    assert all(not c.fits for c in plan.candidates if c is not plan.chosen)
    assert "least sharding and offload that fits" in plan.reason and "<- chosen" in plan.table()
    # without an NVMe folder nothing fits: refused, with how much is missing and what to do
    plan = fit.choose(job(), res(room), 3, "auto", nvme=False)
    assert plan.chosen is None and "misses" in plan.reason
    with pytest.raises(fit.DoesNotFit) as e:
        raise fit.DoesNotFit(plan)
    assert isinstance(e.value, UserError) and "nvme_path" in str(e.value) and "GiB" in str(e.value)


def test_a_spec_that_fits_nowhere_names_what_would(corpus: Path) -> None:
    spec = Spec.from_dict({"data": {"train": str(corpus), "block_size": 512},
                           "train": {"micro_batch_size": 8},
                           "distributed": {"zero_stage": "auto", "offload": "auto"}})  # fmt: skip
    plan = fit.plan_spec(spec, SHAPE, 1, 1, res(5.0, nvme=False))  # the activations of 8 x 512 do not fit
    assert plan.chosen is None
    text = "; ".join(plan.suggestions)
    assert "data.block_size: 256 (ZeRO-0, offload none)" in text, text
    assert "offload: nvme" in text


def test_nvme_folder_checks(tmp_path: Path) -> None:
    free, problem = fit.nvme_check(str(tmp_path))
    assert problem is None and free and free > 0
    assert "does not exist" in (fit.nvme_check(str(tmp_path / "nope"))[1] or "")
    if os.path.isdir("/dev/shm"):
        assert "tmpfs" in (fit.nvme_check("/dev/shm")[1] or "")
    with pytest.raises(Exception, match="absolute path"):
        Spec.from_dict({"data": {"train": "x"}, "distributed": {"nvme_path": "relative/dir"}})


needs_cgroup = pytest.mark.skipif(
    not cgroup.available(), reason="needs a writable cgroup v1 memory controller (root)"
)


def _cli(args: list[str], group: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYTER_LLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "jupyter_llm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: cgroup.enter(group))  # fmt: skip


@needs_cgroup
def test_inside_a_memory_limit_the_launch_fits_itself_or_refuses(corpus: Path, tmp_path: Path) -> None:
    """The real probe inside a cgroup: with room for ZeRO-Infinity only, offload: auto chooses
    NVMe (the dry run shows the table); with less, `train` refuses with exit 2 before any run
    folder is written."""
    (tmp_path / "nvme").mkdir()
    spec = {"name": "fits", "model": {"config": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768}},
            "tokenizer": {"train": {"kind": "char"}},
            "data": {"train": [str(corpus)], "block_size": 64},
            "train": {"micro_batch_size": 4, "max_steps": 2},
            "distributed": {"procs_per_node": 1, "zero_stage": 3, "offload": "auto",
                            "nvme_path": str(tmp_path / "nvme")}}  # fmt: skip
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    with cgroup.memory_limit(f"jllm-fit-{os.getpid()}", int(2.5 * GIB)) as group:
        out = _cli(["train", str(f), "--dry-run"], group, home)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "cgroup" in out.stdout and "<- chosen" in out.stdout, out.stdout
        chosen = next(line for line in out.stdout.splitlines() if "<- chosen" in line)
        assert chosen.split()[:2] == ["3", "nvme"], out.stdout
        assert '"device": "nvme"' in out.stdout  # the DeepSpeed config shown is the chosen one
    spec["distributed"]["zero_stage"] = "auto"
    f.write_text(yaml.safe_dump(spec))
    with cgroup.memory_limit(f"jllm-nofit-{os.getpid()}", int(1.0 * GIB)) as group:
        out = _cli(["train", str(f)], group, home)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "does not fit" in out.stderr and "misses" in out.stderr and "GiB" in out.stderr, out.stderr
        assert cgroup.oom_kills(group) == 0  # refused by the plan, not killed by the kernel
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())  # nothing was written


@pytest.mark.deepspeed
def test_a_launch_with_auto_records_its_choice_and_trains(corpus: Path) -> None:
    """The real launch path: auto values resolved before the run folder is written (spec.yaml
    and ds_config.json hold the chosen stage), the plan in fit.json and a `fitted` event, and
    the run trains to completion with that choice."""
    from conftest import tiny_spec
    from jupyter_llm import launch

    run = launch(tiny_spec(corpus, name="autofit", train={"max_steps": 10, "eval_every": 0, "save_every": 0},
                           distributed={"procs_per_node": 2, "zero_stage": "auto", "offload": "auto"}))  # fmt: skip
    plan = json.loads((run.path / "fit.json").read_text())
    assert plan["chosen"] == {"zero_stage": 0, "offload": "none"}  # a tiny model fits the least sharding
    assert run.spec.distributed.zero_stage == 0 and run.ds_config["zero_optimization"]["stage"] == 0
    fitted = [e for e in run.events() if e["event"] == "fitted"]
    assert len(fitted) == 1 and fitted[0]["zero_stage"] == 0 and "least sharding" in fitted[0]["reason"]
    assert run.wait(600) == "completed"


def test_the_tightest_node_bounds_a_cluster() -> None:
    nodes = {
        "node 0": fit.Resources(8 * GIB, "MemAvailable", (40 * GIB, 30 * GIB), 100 * GIB).to_dict(),
        "node 1": fit.Resources(
            3 * GIB, "cgroup /job (limit 3.00 GiB)", (50 * GIB,), None, "/x is on tmpfs"
        ).to_dict(),
    }
    res = fit.tightest(nodes)
    assert res.host_bytes == 3 * GIB and res.host_source == "node 1: cgroup /job (limit 3.00 GiB)"
    assert (
        res.gpu_free == (30 * GIB,) and res.nvme_free is None and res.nvme_problem == "node 1: /x is on tmpfs"
    )
