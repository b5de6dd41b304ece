"""What checking every zoo file's sha256 on read costs.

Every zoo file is read once into memory and hashed before a tensor is parsed from it
(``zoo.read_checked``). This script builds a synthetic zoo, reads all of it through the Python
API (basis and every adapter's cores: what ``export --all`` or ``zoo.attach`` reads), and times
the same bytes' sha256 alone, in one process, median of several runs:

    python scripts/bench_integrity.py --adapters 64 --layers 8 --hidden 1024 -k 32
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_zoo import generate, module_shapes  # noqa: E402

import sharecompress  # noqa: E402
from sharecompress import Zoo  # noqa: E402


def read_all(path: Path) -> None:
    zoo = Zoo.open(path)
    zoo.bases()
    for name in zoo.names:
        zoo.cores(name)


def zoo_files(path: Path) -> list[Path]:
    zoo = Zoo.open(path)
    return [path / zoo.manifest["basis_file"], *(path / e["file"] for e in zoo.adapters)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes = module_shapes(a.layers, a.hidden, None, ["q_proj", "k_proj", "v_proj", "o_proj"])
        sources = generate(tmp / "src", a.adapters, shapes, a.rank)
        sharecompress.merge([str(p) for p in sources], tmp / "zoo", k=a.k, dtype="float32")
        files = zoo_files(tmp / "zoo")
        blobs = [f.read_bytes() for f in files]
        size = sum(len(b) for b in blobs)
        read_all(tmp / "zoo")  # warm the page cache
        reads, hashes = [], []
        for _ in range(a.repeats):
            start = time.perf_counter()
            read_all(tmp / "zoo")
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            for blob in blobs:
                hashlib.sha256(blob).hexdigest()
            hashes.append(time.perf_counter() - start)
    read, hashing = statistics.median(reads), statistics.median(hashes)
    print(f"zoo: {a.adapters} adapters x {len(shapes)} modules of {a.hidden}x{a.hidden}, k={a.k}: "
          f"{len(files)} files, {size / 1e6:.1f} MB")
    print(f"full verified read (basis + every core), median of {a.repeats}: {read * 1e3:.1f} ms")
    print(f"sha256 of the same bytes alone: {hashing * 1e3:.1f} ms ({size / hashing / 1e9:.2f} GB/s), "
          f"{100 * hashing / read:.0f}% of the read")


if __name__ == "__main__":
    main()
