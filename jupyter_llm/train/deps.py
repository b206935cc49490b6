"""Heavy imports of the processes that train, evaluate and estimate, made once and made lean."""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, without the MLflow import that DeepSpeed's autotuner makes when it is
    imported (`deepspeed.runtime.config` imports `deepspeed.autotuning`, which tries `import
    mlflow` for its own autotuning runs). With MLflow installed (`report_to: mlflow` needs it) that
    import pulled in MLflow, pandas and their dependencies: 3.7 of each rank's 13 s of imports
    on a 2-core machine, paid by every rank of every launch, restart and sweep trial. No rank
    runs DeepSpeed's autotuner, and MLflow is fed from the run folder by the report follower, so
    the autotuner is told MLflow is absent (its `has_mlflow` is False); a later `import mlflow`
    in the same process still works."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed
