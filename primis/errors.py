"""The one exception type the command line turns into a one-line message."""


class PrimisError(Exception):
    """A failure the user can act on: bad input, a wrong key, a corrupted file."""


class PrivacyWarning(UserWarning):
    """Sharing in a mode that the privacy frontier measured to leak the image (public signs,
    or masked signs with a fill below 0.5, without a secret atom order); the command line says
    so on stderr instead."""
