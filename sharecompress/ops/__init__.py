"""Operations on zoos: merge, add, remove, combine, export, and exact errors against originals."""
