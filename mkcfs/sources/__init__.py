"""Sources: everything that produces a ``mkcfs.tree.Node`` tree for a build.

``walk`` reads a directory, ``dumpfile`` parses (and prints) composefs-dump(5) text.
"""
