"""Quality against speed: each model's teacher file of the same runtime and number format, the speed-up over it, the
front of non-dominated models, and one sentence placing the student GGUF against the teacher's file of its type.

Rows are the report's plain dicts: `key`, `stage`, `name`, `runtime` ("torch", "llama_cpp", "onnxruntime"), `kind`
(the number format: "Q4_0", "int4", "nf4"; "" for a folder as saved), `decode_tps`, `bpb`, and `zeroshot`
({task: {"acc_norm", ...}}).
"""

from __future__ import annotations

import math

TEACHERS = ("baseline", "teacher")  # stages of the teacher's own models, the preferred reference first
STUDENT = "gguf"  # the stage of the model the verdict places: what a Pi runs


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def reference(row: dict, rows: list[dict]) -> dict | None:
    """The teacher's model of the same runtime and number format as `row` (one with a decode speed first, then a
    baseline file before the teacher's folder converted on a device), or None: for a teacher model itself, and where
    the teacher has no such file (e.g. ONNX)."""
    if row.get("stage") in TEACHERS or not row.get("runtime"):
        return None
    same = [r for r in rows if r.get("stage") in TEACHERS and (r.get("runtime"), r.get("kind")) ==
            (row["runtime"], row.get("kind"))]
    return min(same, key=lambda r: (_num(r.get("decode_tps")) is None, TEACHERS.index(r["stage"])), default=None)


def add_speedups(rows: list[dict]) -> None:
    """Set each row's `speedup` (decode tok/s over its `reference`'s, in the same runtime and number format) and
    `speedup_vs` (that reference's name); None where there is no reference or a speed is missing."""
    for r in rows:
        ref = reference(r, rows)
        tps, ref_tps = _num(r.get("decode_tps")), _num(ref.get("decode_tps")) if ref else None
        r["speedup"] = tps / ref_tps if tps and ref_tps else None
        r["speedup_vs"] = ref["name"] if ref and r["speedup"] is not None else None


def quality(row: dict, tasks: list[str]) -> float | None:
    """Mean acc_norm over `tasks` (None unless the row has all of them); held-out bits per byte when there are no
    tasks (it compares models whatever their vocabulary)."""
    if not tasks:
        return _num(row.get("bpb"))
    scores = [_num(((row.get("zeroshot") or {}).get(t) or {}).get("acc_norm")) for t in tasks]
    return sum(scores) / len(scores) if scores and None not in scores else None


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(quality, speed) `a` is at least as good as `b` on both and better on one (quality oriented: higher is
    better; negate bits per byte before)."""
    return a[0] >= b[0] and a[1] >= b[1] and a != b


def front(rows: list[dict], tasks: list[str]) -> dict:
    """The models with both a quality and a decode speed, and the keys of those no other model dominates."""
    higher = bool(tasks)
    points = [{"key": r["key"], "name": r["name"], "quality": q, "decode_tps": _num(r.get("decode_tps"))}
              for r in rows if (q := quality(r, tasks)) is not None and _num(r.get("decode_tps"))]
    oriented = [((p["quality"] if higher else -p["quality"]), p["decode_tps"]) for p in points]
    on_front = [p["key"] for p, o in zip(points, oriented) if not any(dominates(x, o) for x in oriented)]
    return {"quality": "mean acc_norm" if higher else "bits per byte", "higher_is_better": higher, "tasks": tasks,
            "points": points, "front": on_front}


def retention(student: dict, teacher: dict, chance: dict[str, float]) -> float | None:
    """The share of the teacher's accuracy above chance that the student keeps: mean over the tasks of
    (student - chance) / (teacher - chance), acc_norm; None when a task lacks a figure or the teacher is at chance."""
    shares = []
    for task, c in chance.items():
        s, t = (_num(((r.get("zeroshot") or {}).get(task) or {}).get("acc_norm")) for r in (student, teacher))
        if s is None or t is None or t <= c:
            return None
        shares.append((s - c) / (t - c))
    return sum(shares) / len(shares) if shares else None


def verdict(rows: list[dict], tasks: list[str], task_labels: list[str],
            chance: dict[str, float] | None = None) -> str | None:
    """"the student is N% faster than the teacher's Q4_0 at M points lower accuracy", "the student is dominated by
    the teacher's Q4_0" (or slower / higher, as measured), with the share of the teacher's accuracy above `chance`
    (task -> chance acc_norm) the student keeps, and the figures after it; None without both models' speed and
    quality."""
    student = next((r for r in rows if r.get("stage") == STUDENT), None)
    teacher = reference(student, rows) if student else None
    if teacher is None:
        return None
    sq, tq = quality(student, tasks), quality(teacher, tasks)
    st, tt = _num(student.get("decode_tps")), _num(teacher.get("decode_tps"))
    if None in (sq, tq) or not st or not tt:
        return None
    higher = bool(tasks)
    better_q = sq > tq if higher else sq < tq
    whom = f"the teacher's {teacher['kind']}" if teacher.get("kind") else "the teacher"
    if st <= tt and not better_q:
        head = f"the student is dominated by {whom}"
    else:
        head = f"the student is {abs(st / tt - 1) * 100:.0f}% {'faster' if st >= tt else 'slower'} than {whom} at "
        head += (f"{abs(tq - sq) * 100:.1f} points {'higher' if better_q else 'lower'} accuracy" if higher
                 else f"{'fewer' if better_q else 'more'} bits per byte")
    if higher and chance and (kept := retention(student, teacher, chance)) is not None:
        head += f", keeping {kept * 100:.0f}% of its accuracy above chance"
    what = f"mean acc_norm over {' and '.join(task_labels)}" if higher else "held-out bits per byte"
    return (f"{head} ({what} {sq:.3f} against {tq:.3f}; decode {st:.1f} against {tt:.1f} tok/s, "
            f"{student['name']} against {teacher['name']})")
