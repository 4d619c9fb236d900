"""The one exception type for errors a user can fix (bad input, missing files, bad config)."""


class SpinDiffusionError(Exception):
    """A user-facing error. Its message is one line that says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
