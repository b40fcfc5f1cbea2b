"""Errors a user can cause and fix."""


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and what to do."""
