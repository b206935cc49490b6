"""The data-preparation job: `python -m jupyter_llm.train.prepare RUN_DIR`.

Started by the supervisor for runs created with `job="prepare"` (`jupyter-llm prepare`,
`%llm_prepare`, `jupyter_llm.prepare`): one process, no DeepSpeed. It does exactly what a
training run's data step does, so a later run of the same spec finds its data in the cache.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from ..folder import SPEC_FILE
from .loop import raise_terminated, record_failure, redirect_output


def main(run_dir: Path) -> None:
    from ..spec import Spec
    from .data import data_stage

    redirect_output(run_dir / "logs" / "prepare.log")
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        spec = Spec.from_yaml((run_dir / SPEC_FILE).read_text())
        index = data_stage(run_dir, spec)
        print(json.dumps({"data": json.loads((run_dir / "data.json").read_text()), **index}, indent=1))
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            record_failure(run_dir, 0, e)
        raise


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jupyter_llm.train.prepare RUN_DIR")
    main(Path(sys.argv[1]).resolve())
