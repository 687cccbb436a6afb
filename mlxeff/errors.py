"""The one exception type the CLI turns into a single clear line."""


class MlxeffError(Exception):
    """A user-facing error: the message names the file (where there is one) and the problem."""

    def __init__(self, message: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
