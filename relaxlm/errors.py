"""The one exception type users see: a message that names what is wrong and how to fix it."""


class RelaxlmError(Exception):
    """A user-facing error; the CLI prints its message and exits non-zero, without a traceback."""
