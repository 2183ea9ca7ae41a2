"""``python -m mkcfs`` runs ``mkcomposefs``."""

import sys

from .cli.mkcomposefs import main

sys.exit(main())
