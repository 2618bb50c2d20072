"""The one exception type users see: its message is a complete, one-line explanation."""


class DiffpruneError(Exception):
    """Bad input or a failed run, explained in one line. The CLI prints it without a traceback."""


class DiffpruneWarning(UserWarning):
    """Something allowed but rarely meant (e.g. a patch scored on another task than its own).
    The CLI prints it as one line: `warning: ...`."""


def first_line(error: BaseException) -> str:
    """A library error's message cut to its first line (or its type when it has none), for
    wrapping it in a one-line DiffpruneError."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TrainingDiverged(DiffpruneError):
    """The loss, a gradient or a trained weight became NaN or infinite. The message names the
    step and the last checkpoint, which never holds a non-finite value."""
