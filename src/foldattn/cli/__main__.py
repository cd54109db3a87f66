"""``python -m foldattn.cli``: the ``foldattn`` command (also under ``torchrun -m foldattn.cli``)."""

import sys

from . import main

sys.exit(main())
