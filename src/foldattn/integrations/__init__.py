"""Integrations of foldattn with training frameworks, one optional module per framework.

- :mod:`foldattn.integrations.lightning`: :class:`~foldattn.integrations.lightning.ASRCallback`, a
  Lightning callback that attaches ASR when the trainer sets up, can log stripe statistics on
  validation batches, and at the end of fitting folds, verifies and saves the deployed model
  (the extra ``foldattn[lightning]``; see ``docs/lightning.md``).

Importing this package imports no framework: each integration imports its framework when it is
itself imported, and names the extra that installs it when that framework is missing.
"""

__all__: list[str] = []
