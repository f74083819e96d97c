"""Output-write benchmark (docs/scale.md): the same bytes written through the page cache with
``write()``, through ``DirectWriter`` (qalora_export/storage/direct_io.py) with and without ``O_DIRECT``,
and copied by the kernel as ``cp`` does (``copy_file_range``), each timed until it returns and
until a ``sync`` after it; ratios are to the kernel copy measured in the same run.

    python benchmarks/bench_writes.py --gib 4 --workdir /tmp/qalora-writes --repeat 2

Not a test: nothing here is asserted. The directory must be on the disk you care about (not tmpfs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from qalora_export.storage.direct_io import DirectWriter

CHUNK = 64 << 20  # bytes handed to each write call (about one GPTQ layer's tensors)


def _timed(fn) -> tuple[float, float]:
    os.sync()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    os.sync()
    return t1 - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="bytes to write, GiB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qalora-writes"))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    n_chunks = max(1, int(args.gib * (1 << 30)) // CHUNK)
    chunk = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8)
    src, out = args.workdir / "source.bin", args.workdir / "out.bin"
    with open(src, "wb") as f:  # the kernel copy's input, read once so that it is warm
        for _ in range(n_chunks):
            f.write(chunk)
    with open(src, "rb") as f:
        while f.read(CHUNK):
            pass

    def plain_write():
        with open(out, "wb") as f:
            for _ in range(n_chunks):
                f.write(chunk)

    def direct_writer(direct: bool):
        def run():
            w = DirectWriter(out, direct=direct)
            for _ in range(n_chunks):
                w.write(chunk)
            w.close()
        return run

    def kernel_copy():
        with open(src, "rb") as fi, open(out, "wb") as fo:
            left = os.fstat(fi.fileno()).st_size
            while left:
                left -= os.copy_file_range(fi.fileno(), fo.fileno(), left)

    ways = {"copy_file_range (cp)": kernel_copy, "write()": plain_write,
            "DirectWriter, O_DIRECT off": direct_writer(False), "DirectWriter, O_DIRECT": direct_writer(True)}
    rows = []
    try:
        for rep in range(args.repeat):
            times = {}
            names = list(ways)
            # a different order each run: an output's freed pages are warm for the next one
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name] = _timed(ways[name])
                out.unlink()
            times = {name: times[name] for name in names}
            ref, ref_synced = times["copy_file_range (cp)"]
            for name, (sec, synced) in times.items():
                row = {"run": rep + 1, "way": name, "gb": n_chunks * CHUNK / 1e9, "seconds": sec,
                       "synced_seconds": synced, "ratio_to_cp": sec / ref, "synced_ratio_to_cp": synced / ref_synced}
                rows.append(row)
                print(json.dumps(row))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print("| run | way | GB | s | s with sync | ratio to cp | ratio with sync |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['way']} | {r['gb']:.2f} | {r['seconds']:.2f} | {r['synced_seconds']:.2f} | "
              f"{r['ratio_to_cp']:.2f} | {r['synced_ratio_to_cp']:.2f} |")


if __name__ == "__main__":
    main()
