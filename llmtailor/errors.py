"""Errors a user can cause and fix."""


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
