"""``python -m mkcfs`` runs the ``mkcfs`` command group (``python -m mkcfs.cli.mkcomposefs`` runs
``mkcomposefs``)."""

import sys

from mkcfs.cli.mkcfs import main

sys.exit(main())
