"""The one exception type the command line turns into a one-line message."""


class PrimisError(Exception):
    """A failure the user can act on: bad input, a wrong key, a corrupted file."""


class PrivacyWarning(UserWarning):
    """Sharing in a mode that the privacy frontier measured to leak the image (public signs,
    or masked signs with a fill below 0.5, without a secret atom order); the command line says
    so on stderr instead."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined by '; ', at most ``limit``
    characters), or its type's name where it has none: decoders often put the cause on the
    lines after a general first one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines).replace(":; ", ": ")  # a line that introduces the next ones
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(err).__name__
