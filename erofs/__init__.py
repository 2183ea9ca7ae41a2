"""EROFS image format as composefs uses it: declarations, layout planner, writer and reader."""
