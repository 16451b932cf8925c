"""The one exception type users see: its message is printed as a single line by the CLI."""

from pydantic import ValidationError


class AecompressError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def describe(error: ValidationError, what: str) -> str:
    """One line naming every invalid or unknown key of a validation error."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in error.errors()
    )
    return f"{what}: {problems}".replace("\n", " ")
