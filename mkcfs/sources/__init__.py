"""Sources: everything that produces a ``mkcfs.tree.Node`` tree for a build.

``walk`` reads a directory, ``dumpfile`` parses (and prints) composefs-dump(5) text, ``oci``
reads container images (``transport`` names them, ``layerstream`` checks and decompresses
blobs, ``tarlayer`` reads layer tars, ``layers`` merges them).
"""
