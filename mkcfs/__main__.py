"""``python -m mkcfs`` runs ``mkcomposefs``."""

import sys

from mkcfs.cli.mkcomposefs import main

sys.exit(main())
