"""`python -m difflab ARGS` (and `torchrun ... -m difflab ARGS`): what `python run.py ARGS` runs, without a clone."""

from difflab.cli import main

if __name__ == "__main__":  # not in the copies of this module that spawned worker processes import
    main()
