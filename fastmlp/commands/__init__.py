"""Sub-commands of the ``fastmlp`` CLI; each module defines ``register(subparsers)``."""
