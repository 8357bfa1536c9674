"""``python -m glowlab`` is the ``glowlab`` command."""

from glowlab.cli import main

main()
