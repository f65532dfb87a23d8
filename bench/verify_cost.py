"""What checking artifacts against their manifests costs a run: every file's sha256, cold and from the hash cache.

    python bench/verify_cost.py [RUN]   (default runs/default: a finished `make edge` run folder)

`pistill run` checks each stage's inputs and every finished artifact it skips. Cold (an empty hash cache: the first
run after an upgrade, or a new machine) every file is read once; warm (files unchanged since they were written or
last hashed) it is one stat per file. Both are timed over every artifact of RUN (a private, empty PISTILL_CACHE for
the cold pass) and set against the run's own wall time (the sum of its manifests' `wall_s`). Prints a Markdown table
and writes `RUN/../verify_cost.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pistill.artifact import Artifact, machine_summary
from pistill.verify import artifact_folders, problems


def timed(arts: list[Artifact]) -> float:
    t0 = time.perf_counter()
    bad = [p for a in arts for p in problems(a)]
    assert not bad, bad  # a damaged run is not a measure of the cost
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="runs/default")
    run = Path(ap.parse_args().run)
    arts = [Artifact.load(f) for f in artifact_folders(run)]
    files = sum(len(a.manifest.get("files", {})) for a in arts)
    size = sum(f["bytes"] for a in arts for f in a.manifest.get("files", {}).values())
    wall = sum(a.manifest.get("wall_s", 0) for a in arts)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PISTILL_CACHE"] = cache
        cold = timed(arts)
        warm = min(timed(arts) for _ in range(3))
    row = {"machine": machine_summary(), "artifacts": len(arts), "files": files, "bytes": size, "run_wall_s": wall,
           "cold_s": round(cold, 2), "warm_s": round(warm, 3),
           "cold_share": round(cold / wall, 4) if wall else None, "warm_share": round(warm / wall, 5) if wall else None}
    (run.parent / "verify_cost.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"| run | artifacts | files | GB | run wall s | cold check s (share) | warm check s (share) |\n|---|---|---|---|---|---|---|\n"
          f"| {run} | {len(arts)} | {files} | {size / 1e9:.2f} | {wall:.0f} | {cold:.1f} ({row['cold_share']:.2%}) | "
          f"{warm:.3f} ({row['warm_share']:.3%}) |")
    print(f"machine: {row['machine']}")


if __name__ == "__main__":
    main()
