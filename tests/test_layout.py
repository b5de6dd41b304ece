"""The package's rooms (docs/architecture.md): each imports only the rooms below it, and nothing imports ``zoo``."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sharecompress"
ALLOWED = {
    "io": {"errors"},
    "core": {"errors", "io"},
    "store": {"errors", "io", "core"},
    "ops": {"errors", "io", "core", "store"},
    "runtime": {"errors", "io", "core", "store", "ops"},
    "report": {"errors", "io", "core", "store", "ops"},
}


def imported_rooms(path: Path, room: str) -> set[str]:
    """The top-level parts of the package a module imports (relative or absolute), its own room left out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "sharecompress":
                    continue
                names = parts[1:2] or [alias.name for alias in node.names]
            elif node.level == 1:
                continue  # the same room
            else:
                names = (node.module or "").split(".")[:1] or [alias.name for alias in node.names]
            found.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sharecompress."))
    return {r.removesuffix(".py") for r in found} - {room, "_version"}  # the version is below everything


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_the_rooms_below_it(room):
    for path in sorted((PACKAGE / room).glob("*.py")):
        extra = imported_rooms(path, room) - ALLOWED[room]
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


def test_the_bottom_modules_import_nothing_of_the_package():
    for name in ("errors.py", "_version.py"):
        assert imported_rooms(PACKAGE / name, "") == set(), name
