"""User-facing errors.

Every error a user can cause with bad input is a :class:`PLDRError`. The CLI prints its message on
one line and exits with status 2; library users catch it as a ``ValueError``.
"""


class PLDRError(ValueError):
    """A bad input (file, hyperparameter, argument) described in one line."""
