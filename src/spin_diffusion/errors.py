"""The one exception type for errors a user can fix (bad input, missing files, bad config)."""


class SpinDiffusionError(Exception):
    """A user-facing error. Its message is one line that says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


def one_line(err: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), or its type's name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__
