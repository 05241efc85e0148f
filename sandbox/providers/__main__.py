"""Entry point of `python -m sandbox.providers`."""

from sandbox.providers.cli import main

main()
