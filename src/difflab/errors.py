"""The one exception type for mistakes a user can fix.

run.py catches it and prints its message (one sentence naming the problem and the fix)
without a traceback, then exits with status 2.
"""


class UserError(Exception):
    """A problem in the user's config, files or command line, with the fix in its message."""
