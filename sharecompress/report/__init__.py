"""What a zoo kept and lost: the report tables and JSON, and its figures (PNG, HTML)."""
