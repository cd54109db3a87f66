"""The package version, set here once (pyproject.toml reads it; ``foldattn --version`` prints it)."""

__version__ = "0.2.0"
