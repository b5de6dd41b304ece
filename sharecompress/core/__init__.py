"""The math: bases, cores and exact errors from factors (pure functions on tensors, no files)."""

METHODS = ("share", "paper")  # how bases are found (``compress``); the manifest schema checks the same list
