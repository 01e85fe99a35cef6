"""difflab's entry point: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works before `pip install -e .` too

from difflab.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
