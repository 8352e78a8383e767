"""How the CLI reports a user's mistake: one ``Error: ...`` line and exit code 1.

``FASTBEGAN_DEBUG=1`` shows the full traceback instead.
"""
from __future__ import annotations

import functools
import os

import click

from .checkpoint import CheckpointError
from .data import DataError

USER_ERRORS = (DataError, CheckpointError, ValueError, RuntimeError, OSError)


def user_errors(fn):
    """Turn expected failures into a one-line ``Error: ...`` instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as e:
            if os.environ.get("FASTBEGAN_DEBUG") == "1":
                raise
            raise click.ClickException(str(e) or e.__class__.__name__) from None
    return wrapper
