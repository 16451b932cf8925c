"""The one exception type users see: its message is printed as a single line by the CLI."""

from pydantic import ValidationError


class AecompressError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def describe(error: ValidationError, what: str) -> str:
    """One line naming every invalid or unknown key of a validation error."""
    problems = "; ".join(_problem(e["loc"], e["msg"]) for e in error.errors())
    return f"{what}: {problems}".replace("\n", " ")


def _problem(location: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in location)}: {message}" if location else message


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its repr when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else repr(error)
