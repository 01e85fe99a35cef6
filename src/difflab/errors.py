"""The exceptions run.py turns into a message instead of a traceback.

UserError: a mistake a user can fix; run.py prints its message (one sentence naming the
problem and the fix) and exits with status 2. TrainingInterrupted: Ctrl-C or SIGTERM during
training, after the last step was saved, and SamplingInterrupted: the same after training, while
sampling or evaluating; run.py says how to continue and exits with 130.
"""

from pathlib import Path


class UserError(Exception):
    """A problem in the user's config, files or command line, with the fix in its message."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training between two steps, and `checkpoint` holds the last one.
    A KeyboardInterrupt, so a sweep stops too rather than going on to its next job."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped sampling or evaluation; the trained model is in `checkpoint`."""

    def __init__(self, checkpoint: str):
        super().__init__("sampling interrupted")
        self.checkpoint = checkpoint
