"""Entry point of each rank: `python -m jupyter_llm.train RUN_DIR`."""

import sys
from pathlib import Path

from .loop import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if len(args) != 1:
        sys.exit("usage: python -m jupyter_llm.train RUN_DIR")
    main(Path(args[0]).resolve())
