"""Reading images back: ``unflatten`` rebuilds a tree from what ``erofs.reader`` decodes, for
composefs-info, composefs-dump and the round-trip tests."""
