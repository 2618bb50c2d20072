"""The one exception type users see: its message is a complete, one-line explanation."""


class DiffpruneError(Exception):
    """Bad input or a failed run, explained in one line. The CLI prints it without a traceback."""


class TrainingDiverged(DiffpruneError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
