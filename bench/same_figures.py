"""Do two run folders report the same model figures? Size and quality per model row, speeds left out.

    python bench/same_figures.py runs/before runs/after

Compares each report row's parameters, bytes, held-out perplexity / top-1 agreement / KL and every zero-shot
task's acc and acc_norm (exactly: the same code on the same machine and seeds gives the same numbers). Speeds,
wall times and latency depend on what else the machine does and are not compared. Prints one line per row and a
verdict; exits 1 when a figure differs, 2 when a folder has no report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIGURES = ("params", "bytes", "ppl", "agreement", "kl")
TASK_FIGURES = ("n", "acc", "acc_norm")


def figures(row: dict) -> dict[str, object]:
    """{figure name: value} of one report row: size, held-out quality, zero-shot per task."""
    out = {k: row.get(k) for k in FIGURES}
    for task, z in sorted((row.get("zeroshot") or {}).items()):
        out.update({f"{task}.{k}": z.get(k) for k in TASK_FIGURES})
    return out


def read_rows(run: Path) -> dict[str, dict]:
    path = run / "report" / "report.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise LookupError(f"{path} cannot be read ({e}); run the pipeline there first") from None
    return {r["name"]: figures(r) for r in rows}


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """One line per row: "same (n figures)" or the figures that differ, with both values."""
    lines = []
    for name in dict.fromkeys([*a, *b]):
        if name not in a or name not in b:
            lines.append(f"{name}: only in the {'second' if name in b else 'first'} run")
            continue
        diff = [f"{k} {a[name].get(k)} -> {b[name].get(k)}" for k in dict.fromkeys([*a[name], *b[name]])
                if a[name].get(k) != b[name].get(k)]
        lines.append(f"{name}: " + ("; ".join(diff) if diff else f"same ({len(a[name])} figures)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = p.parse_args(argv)
    try:
        lines = compare(read_rows(args.before), read_rows(args.after))
    except LookupError as e:
        print(f"same_figures: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    same = all(": same (" in ln for ln in lines)
    print("the same figures" if same else "figures differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
