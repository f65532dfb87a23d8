"""What a model will do on a device before it is built: its GGUF file's bytes from its shape, its decode and prefill
speed and its peak memory from those bytes, fitted to every measurement on that device as it arrives.

The vocabulary matrices are part of those bytes at their own rate, with as many rows as the trial keeps ([prune]
vocab): the output projection is read for every token (a tied embedding is that one matrix), and the tokenizer in
the file's header shrinks with the vocabulary too.

Decode on a CPU is memory-bound: every token reads every weight once, so the seconds per token are close to a fixed
cost plus the file's bytes over the bandwidth the runtime reaches (`a + b * bytes`). Each GGUF type has its own
kernels (a Q4_K_M byte costs more to unpack than a Q4_0 byte), so there is one line per type and thread count.
Prefill is compute-bound: seconds per prompt token follow the multiply-adds per token (`a + b * 2 * matrix
weights`), again per type and thread count. Peak memory is the file plus the runtime and its buffers (`a + b *
bytes`, one line). A line of a type and thread count with one point goes through the origin and that point; from
two points on it is the least-squares line (through the origin again when noise tilts it the wrong way). With no
point of that type yet it is the through-origin line of the other types' points at that thread count, and with
none at all it starts from the device's copy bandwidth (decode reaches about half of it, `DECODE_BW_SHARE`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")  # GGUF names of the vocabulary matrices
DECODE_BW_SHARE = 0.5  # decode reads the weights at about half the copy bandwidth (llama.cpp, 2-core x86 and Pi 5)
RSS_OVERHEAD_MB = 250.0  # python + llama.cpp + buffers before any point is measured (this machine: 210 to 260 MB)


@dataclass(frozen=True)
class FileRates:
    """Bits per weight of one GGUF type, from a file of that type: the vocabulary matrices apart (llama.cpp keeps
    them at a higher type), the other weights, and the bytes that are not tensors (tokenizer, metadata)."""

    embed_bpw: float
    other_bpw: float
    header_bytes: int

    def bytes(self, embed_params: int, other_params: int, vocab_share: float = 1.0) -> int:
        """A file's bytes from its vocabulary matrices' and other weights' counts; `vocab_share` of the vocabulary
        kept scales the header (the tokenizer is most of it)."""
        weights = embed_params * self.embed_bpw + other_params * self.other_bpw
        return int(self.header_bytes * vocab_share + weights / 8)


def file_rates(path: Path) -> FileRates:
    """The bits per weight of a GGUF file's vocabulary matrices and of its other tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    embed = [0, 0]
    other = [0, 0]
    for t in reader.tensors:
        side = embed if t.name in EMBEDDING_TENSORS else other
        side[0] += int(t.n_bytes)
        side[1] += int(t.n_elements)
    total = Path(path).stat().st_size
    return FileRates(embed_bpw=8 * embed[0] / max(embed[1], 1), other_bpw=8 * other[0] / max(other[1], 1),
                     header_bytes=total - embed[0] - other[0])


@dataclass(frozen=True)
class Point:
    """One measurement of a GGUF file on the device."""

    bytes: int
    matmul_params: int  # weights multiplied per token (every matrix but the embedding lookup)
    threads: int
    quant: str
    decode_tps: float
    prefill_tps: float | None = None
    peak_rss_mb: float | None = None
    label: str = ""


@dataclass
class Line:
    """y = a + b * x, with how it was fitted."""

    a: float
    b: float
    how: str

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


def fit(xs: list[float], ys: list[float], prior_b: float | None) -> Line | None:
    """Least squares from two distinct x on; through the origin with one point (or when the line would fall with
    x, which noise can do on close points); `prior_b` through the origin with none (None: no line)."""
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and math.isfinite(y) and y > 0]
    if not pts:
        return Line(0.0, prior_b, "prior") if prior_b else None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if n >= 2 and sxx > 0:
        b = sum((x - mx) * (y - my) for x, y in pts) / sxx
        a = my - b * mx
        if b > 0 and a >= 0:
            return Line(a, b, f"least squares on {n} points")
    return Line(0.0, sum(y for _, y in pts) / sum(x for x, _ in pts), f"through the origin, {n} point(s)")


@dataclass
class SpeedModel:
    """Predicts a GGUF's bytes, decode / prefill tok/s and peak RSS on one device (or the slowest of a fleet)."""

    rates: dict[str, FileRates] = field(default_factory=dict)  # GGUF type -> its rates
    bandwidth_gbs: float | None = None  # the device's copy bandwidth (the agent's probe)
    points: list[Point] = field(default_factory=list)

    def add(self, point: Point) -> None:
        self.points.append(point)

    def file_bytes(self, quant: str, embed_params: int, other_params: int, vocab_share: float = 1.0) -> int | None:
        rates = self.rates.get(quant)
        return rates.bytes(embed_params, other_params, vocab_share) if rates else None

    def _line(self, threads: int, quant: str, x, y, prior: float | None) -> Line | None:
        """The line of this type and thread count; else through the origin on every type's points at this thread
        count; else `prior`."""
        at = [p for p in self.points if p.threads == threads and y(p)]
        same = [p for p in at if p.quant == quant]
        if same:
            return fit([x(p) for p in same], [1 / y(p) for p in same], None)
        line = fit([x(p) for p in at], [1 / y(p) for p in at], prior) if at else fit([], [], prior)
        if line is not None and at:
            line = Line(0.0, sum(1 / y(p) for p in at) / sum(x(p) for p in at), f"other types, {len(at)} point(s)")
        return line

    def decode_line(self, threads: int, quant: str) -> Line | None:
        prior = 1 / (DECODE_BW_SHARE * self.bandwidth_gbs * 1e9) if self.bandwidth_gbs else None
        return self._line(threads, quant, lambda p: p.bytes, lambda p: p.decode_tps, prior)

    def prefill_line(self, threads: int, quant: str) -> Line | None:
        return self._line(threads, quant, lambda p: 2 * p.matmul_params, lambda p: p.prefill_tps, None)

    def rss_line(self) -> Line:
        pts = [p for p in self.points if p.peak_rss_mb]
        line = fit([p.bytes / 1e6 for p in pts], [p.peak_rss_mb for p in pts], None)
        if line is None or line.how.startswith("through"):  # memory has a large fixed part: never through 0
            extra = [p.peak_rss_mb - p.bytes / 1e6 for p in pts]
            return Line(sum(extra) / len(extra) if extra else RSS_OVERHEAD_MB, 1.0,
                        f"file + mean overhead of {len(extra)} point(s)" if extra else "file + prior overhead")
        return line

    def predict(self, file_bytes: int, matmul_params: int, threads: int, quant: str) -> dict:
        """{"decode_tps", "prefill_tps", "peak_rss_mb"} for a `quant` file of `file_bytes` (None where nothing is
        known)."""
        dec, pre = self.decode_line(threads, quant), self.prefill_line(threads, quant)
        return {"decode_tps": 1 / dec(file_bytes) if dec else None,
                "prefill_tps": 1 / pre(2 * matmul_params) if pre else None,
                "peak_rss_mb": self.rss_line()(file_bytes / 1e6)}

    def describe(self, threads: list[int], quants: list[str]) -> dict:
        """The fitted lines, for the record: decode and prefill per type and thread count, memory."""
        out = {"bandwidth_gbs": self.bandwidth_gbs, "points": len(self.points), "rss": asdict(self.rss_line())}
        for t in threads:
            for q in quants:
                for name, line in (("decode", self.decode_line(t, q)), ("prefill", self.prefill_line(t, q))):
                    out[f"{name}_{q}_t{t}"] = asdict(line) if line else None
        return out


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, None when either is missing."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured
