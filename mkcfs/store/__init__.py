"""The object store and what fills it: ``objects`` (the content-addressed store itself) and
``digests`` (the hashing workers that compute fs-verity digests and add files to the store)."""
