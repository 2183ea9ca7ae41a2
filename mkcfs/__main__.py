"""``python -m mkcfs`` runs the ``mkcfs`` command group (``python -m mkcfs.cli.mkcomposefs`` runs
``mkcomposefs``)."""

from mkcfs.cli.mkcfs import console

console()
