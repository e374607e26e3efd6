"""The one exception type users see: a message that names what is wrong and how to fix it."""


class RelaxlmError(Exception):
    """A user-facing error; the CLI prints its message and exits non-zero, without a traceback."""


class Unavailable(RelaxlmError):
    """The model cannot answer now (a replica died while answering, or none is up); the same
    request may succeed when retried. The server answers it with a 503."""
