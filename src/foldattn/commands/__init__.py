"""Sub-commands of the ``foldattn`` CLI (each module exposes ``register(subparsers)``)."""
