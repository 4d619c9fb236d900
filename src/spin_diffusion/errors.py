"""The one exception type for errors a user can fix (bad input, missing files, bad config)."""


class SpinDiffusionError(Exception):
    """A user-facing error. Its message is one line that says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), or its type's name."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(err).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
