"""``python -m semcache ...`` runs the command line."""

from .cli import main

main()
