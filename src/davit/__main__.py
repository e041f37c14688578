"""``python -m davit`` (and ``torchrun -m davit``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
