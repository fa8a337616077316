"""The one exception type headlens raises for bad input; the CLI prints its message without a traceback."""


class HeadlensError(Exception):
    """A user-facing error whose message says what went wrong and what to do."""
