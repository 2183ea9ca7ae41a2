"""From a tree to image bytes: ``overlay`` (composefs policy: overlay xattrs, escaping,
whiteouts), ``flatten`` (tree -> flat inode records for the planner) and ``image``
(``build_image``: flatten, plan and emit with ``erofs``, and atomic writing of the result)."""
