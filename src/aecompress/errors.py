"""The one exception type users see: its message is printed as a single line by the CLI."""


class AecompressError(Exception):
    """A problem with the user's input or environment, stated in one line."""
