"""The one exception type that the CLI turns into a single clear error line."""


class LrqError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
