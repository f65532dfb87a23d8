"""pistill.front: the same-runtime, same-type teacher model each row is compared with, the front of non-dominated
models, and the sentence placing the student GGUF against the teacher's file of its type."""

from __future__ import annotations

import pytest

from pistill.front import add_speedups, dominates, front, quality, reference, retention, verdict

TASKS = ["arc_easy", "piqa"]


def row(key, runtime, kind, tps=None, arc=None, piqa=None, bpb=None, name=None):
    zs = {t: {"acc_norm": v} for t, v in (("arc_easy", arc), ("piqa", piqa)) if v is not None}
    return {"key": key, "stage": key.split(":")[0], "name": name or key, "runtime": runtime, "kind": kind,
            "decode_tps": tps, "bpb": bpb, "zeroshot": zs}


ROWS = [
    row("teacher", "torch", "", 10.0, 0.50, 0.66, 19.0),
    row("baseline", "llama_cpp", "Q4_0", 110.0, 0.46, 0.64, 21.0, "teacher GGUF Q4_0"),
    row("baseline:Q8_0", "llama_cpp", "Q8_0", 80.0, 0.49, 0.65, 19.2, "teacher GGUF Q8_0"),
    row("prune", "torch", "", 15.0, 0.30, 0.53, 43.0),
    row("quantize", "torch", "nf4", 8.0),
    row("distill", "torch", "", 15.0, 0.37, 0.55, 23.0),
    row("gguf", "llama_cpp", "Q4_0", 147.0, 0.36, 0.54, 25.0, "student GGUF Q4_0"),
    row("onnx", "onnxruntime", "int4", 150.0, 0.35, 0.53, 29.0),
]


@pytest.mark.parametrize("key, expected", [
    ("gguf", "baseline"),  # llama.cpp Q4_0 against llama.cpp Q4_0
    ("distill", "teacher"), ("prune", "teacher"),  # torch folders against the torch teacher
    ("quantize", None), ("onnx", None),  # no teacher file in NF4 or in ONNX int4
    ("teacher", None), ("baseline:Q8_0", None),  # the teacher's own models are the references
])
def test_reference_is_same_runtime_and_type(key, expected):
    r = next(r for r in ROWS if r["key"] == key)
    assert (reference(r, ROWS) or {}).get("key") == expected


def test_a_baseline_file_is_preferred_to_the_teacher_converted_on_a_device():
    rows = [row("teacher", "llama_cpp", "Q4_0", 100.0), row("baseline", "llama_cpp", "Q4_0", 105.0),
            row("gguf", "llama_cpp", "Q4_0", 140.0)]
    add_speedups(rows)
    assert rows[2]["speedup"] == pytest.approx(140 / 105) and rows[2]["speedup_vs"] == "baseline"
    assert rows[0]["speedup"] is None and rows[1]["speedup"] is None


def test_speedups_of_the_rows():
    rows = [dict(r) for r in ROWS]
    add_speedups(rows)
    got = {r["key"]: r["speedup"] for r in rows}
    assert got["gguf"] == pytest.approx(147 / 110) and got["distill"] == pytest.approx(1.5)
    assert got["onnx"] is None and got["quantize"] is None and got["teacher"] is None


def test_quality_and_front():
    assert quality(ROWS[0], TASKS) == pytest.approx(0.58) and quality(ROWS[4], TASKS) is None
    assert quality(ROWS[0], []) == 19.0
    fr = front(ROWS, TASKS)
    assert fr["quality"] == "mean acc_norm" and fr["higher_is_better"]
    assert [p["key"] for p in fr["points"]] == ["teacher", "baseline", "baseline:Q8_0", "prune", "distill", "gguf",
                                                "onnx"]
    assert fr["front"] == ["teacher", "baseline", "baseline:Q8_0", "gguf", "onnx"]  # prune, distill: dominated
    by_bpb = front(ROWS, [])
    assert not by_bpb["higher_is_better"] and "prune" not in by_bpb["front"] and "teacher" in by_bpb["front"]


@pytest.mark.parametrize("a, b, expected", [
    ((0.5, 10.0), (0.4, 10.0), True), ((0.5, 10.0), (0.5, 10.0), False), ((0.5, 9.0), (0.4, 10.0), False),
])
def test_dominates(a, b, expected):
    assert dominates(a, b) is expected


@pytest.mark.parametrize("student, expected", [
    (row("gguf", "llama_cpp", "Q4_0", 147.0, 0.36, 0.54),
     "the student is 34% faster than the teacher's Q4_0 at 10.0 points lower accuracy (mean acc_norm over ARC-Easy "
     "and PIQA 0.450 against 0.550; decode 147.0 against 110.0 tok/s, gguf against teacher GGUF Q4_0)"),
    (row("gguf", "llama_cpp", "Q4_0", 100.0, 0.40, 0.54), "the student is dominated by the teacher's Q4_0 ("),
    (row("gguf", "llama_cpp", "Q4_0", 110.0, 0.46, 0.64), "the student is dominated by the teacher's Q4_0 ("),
    (row("gguf", "llama_cpp", "Q4_0", 121.0, 0.50, 0.66), "the student is 10% faster than the teacher's Q4_0 at "
                                                          "3.0 points higher accuracy"),
    (row("gguf", "llama_cpp", "Q4_0", 99.0, 0.50, 0.66), "the student is 10% slower than the teacher's Q4_0 at "
                                                         "3.0 points higher accuracy"),
])
def test_verdict(student, expected):
    assert verdict(ROWS[:3] + [student], TASKS, ["ARC-Easy", "PIQA"]).startswith(expected)


def test_verdict_by_bits_per_byte_and_without_a_reference():
    rows = ROWS[:3] + [row("gguf", "llama_cpp", "Q4_0", 147.0, bpb=25.0)]
    assert verdict(rows, [], []) == ("the student is 34% faster than the teacher's Q4_0 at more bits per byte "
                                     "(held-out bits per byte 25.000 against 21.000; decode 147.0 against 110.0 tok/s, "
                                     "gguf against teacher GGUF Q4_0)")
    assert verdict([r for r in ROWS if r["stage"] != "baseline"], TASKS, ["A", "P"]) is None  # no teacher Q4_0
    assert verdict(ROWS[:3] + [row("gguf", "llama_cpp", "Q4_0", 147.0, 0.3)], TASKS, ["A", "P"]) is None  # no PIQA


def test_verdict_states_the_accuracy_above_chance_the_student_keeps():
    student = row("gguf", "llama_cpp", "Q4_0", 147.0, 0.36, 0.54)
    chance = {"arc_easy": 0.25, "piqa": 0.5}
    # ARC-Easy (0.36 - 0.25) / (0.46 - 0.25) = 52.4%, PIQA (0.54 - 0.5) / (0.64 - 0.5) = 28.6%: mean 40%
    assert verdict(ROWS[:3] + [student], TASKS, ["ARC-Easy", "PIQA"], chance).startswith(
        "the student is 34% faster than the teacher's Q4_0 at 10.0 points lower accuracy, keeping 40% of its "
        "accuracy above chance (mean acc_norm")
    assert retention(student, ROWS[1], chance) == pytest.approx((0.11 / 0.21 + 0.04 / 0.14) / 2)
    assert retention(student, row("baseline", "llama_cpp", "Q4_0", 1.0, 0.25, 0.64), chance) is None  # at chance
