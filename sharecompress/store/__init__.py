"""The zoo on disk: its naming scheme, manifest schema, checked reads, atomic writes, transactions, verify."""
