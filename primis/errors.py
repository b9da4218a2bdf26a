"""The one exception type the command line turns into a one-line message."""


class PrimisError(Exception):
    """A failure the user can act on: bad input, a wrong key, a corrupted file."""
