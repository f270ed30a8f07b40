"""User-facing errors.

Every error a user can cause with bad input is a :class:`PLDRError`. The CLI prints its message on
one line and exits with status 2; library users catch it as a ``ValueError``.
"""


class PLDRError(ValueError):
    """A bad input (file, hyperparameter, argument) described in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for a PLDRError."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
