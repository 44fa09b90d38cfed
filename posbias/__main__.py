"""``python -m posbias`` runs the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not on import (the docs build inspects every module)
    sys.exit(main())
