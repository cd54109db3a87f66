"""The error every command reports as one line (``foldattn CMD: error: ...``, exit 2), apart from the
package's ``main`` so that the command modules import it without importing the command line itself."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """An error the CLI reports as one line, without a traceback."""
