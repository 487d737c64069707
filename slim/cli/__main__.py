"""``python -m slim.cli``: the ``slim`` command (how ``slim serve`` starts its parts)."""

from slim.cli import main

main()
