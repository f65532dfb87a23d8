"""`pistill search`: the best student for a decode-speed and memory budget on a device, found by measuring on it.

An Optuna study (TPE, two objectives: quality and decode tok/s, with the budget as constraints) proposes a pruning
shape (layers, MLP share, query heads; with `vocab` and `mend`, the tokens kept and the mending of dropped layers),
a file type (GGUF types, ONNX int4) and a thread count. Before anything is built, `speedmodel` predicts the trial's
file bytes, decode and prefill speed and peak memory on the device; a trial predicted to miss the budget by more
than `skip_margin` is skipped (recorded, not built). Every other trial runs the recipe's stages with that shape
(prune, the shared distillation teacher, a short healing distillation, the export with its checks), is benchmarked
on the target and scored (held-out perplexity and KL of the file, zero-shot accuracy on the recipe's tasks), and its
measurement refits the predictor.

First each device of the target is reached and probed as `pistill doctor` does (`BenchConfig.check_devices`), so an
unreachable or untrusted device fails in seconds, not after the teacher's reference files are built.

Everything is an artifact: the teacher, the data and the distillation teacher once in `<out>/shared`, each trial's
stages in `<out>/trials/<params hash>` (content-keyed: a finished stage is skipped), the study in `<out>/study.db`
(SQLite). Once a trial is measured its pruned and distilled models and unquantized GGUF are removed (`keep_trials`
keeps them); their manifests stay, so the trial's stages are still reused, and rebuilt only when a later stage must
run again on them. Before each trial the free disk space of `<out>` is checked against the largest trial so far.
A rerun of the same command reuses every finished trial; a trial interrupted mid-way is asked again with the same
parameters and continues from its finished stages (and the distillation from its checkpoint). The teacher's
own files of each type, measured the same way, are the predictor's first points and the report's references.

At the end the best measured trial within the budget (by `objective`) is benchmarked again (`confirm`); its recipe is
written as `best.toml`, which `pistill run` reproduces; `search.json`, `search.md` and `search.html` hold the trials,
the front and the predictor's error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .artifact import MANIFEST, Artifact, config_dict, read_manifest
from .errors import OutputError, UsageError, UserError
from .rundir import atomic_write

log = logging.getLogger(__name__)

OBJECTIVES = ("bpb", "ppl", "accuracy")
LOWER_IS_BETTER = ("bpb", "ppl")
TRIAL_STAGES = ("prune", "quantize", "distill")  # built per trial (unless the key ignores the pruning), then the export
ONNX_INT4 = "onnx-int4"  # the ONNX export ([onnx] options, 4-bit MatMulNBits) as a choice beside the GGUF types


def export_stage(quant: str) -> str:
    """The stage that writes a trial's file: "onnx" for ONNX_INT4, else "gguf"."""
    return "onnx" if quant == ONNX_INT4 else "gguf"
MAX_ASKS_PER_TRIAL = 20  # skipped or repeated proposals allowed per trial measured before the search gives up
DISK_PER_TRIAL = 1_200_000_000  # bytes a trial is taken to need before one has finished (SmolLM2-135M: about 1 GB)
PRUNE_AXES = ("n_heads", "vocab", "mend")  # searched only when listed; passed to the trial's [prune] as they are


@dataclass(frozen=True)
class SearchConfig:
    """The search space, the budget and the effort per trial ([search] in a recipe; the command line overrides the
    budget, the trial count and the target)."""

    VERSION: ClassVar[int] = 2
    trials: int = 12  # trials built and measured (skipped ones are not counted)
    steps: int = 8  # healing distillation steps per trial; [distill] gives everything else
    n_layer: list[int] = field(default_factory=list)  # [fewest, most] layers kept; [] = 40% .. all of the teacher's
    ffn_ratio: list[float] = field(default_factory=lambda: [0.5, 1.0])  # [lowest, highest] share of MLP channels
    ffn_step: float = 0.125  # MLP share step
    n_heads: list[int] = field(default_factory=list)  # query-head counts tried; [] = the recipe's [prune] n_heads
    vocab: list[int] = field(default_factory=list)  # [fewest, most] tokens kept ([prune] vocab); [] = the recipe's
    mend: list[str] = field(default_factory=list)  # [prune] mend choices, e.g. ["none", "linear"]; [] = the recipe's
    quants: list[str] = field(default_factory=lambda: ["Q4_0", "Q4_K_M", "Q8_0"])  # GGUF types tried; "onnx-int4"
    threads: list[int] = field(default_factory=list)  # runtime threads tried; [] = [bench] threads
    # "bpb": the file's held-out bits per byte (compares any vocabulary); "ppl": its perplexity per teacher token (the
    # same ranking); "accuracy": mean acc_norm over [eval] tasks
    objective: str = "bpb"
    eval_items: int = 100  # zero-shot items per task per trial (0 = none: then objective must be ppl)
    min_decode_tok_s: float = 0.0  # the budget: decode at least this fast on the target (0 = no limit)
    max_memory_mb: float = 0.0  # ... and peak memory at most this (0 = no limit)
    skip_margin: float = 0.15  # skip a trial predicted more than this share outside the budget
    confirm: bool = True  # benchmark the chosen model again before writing best.toml
    seed: int = 0  # the sampler's seed
    keep_trials: bool = False  # keep each trial's pruned and distilled models and unquantized GGUF once measured

    def __post_init__(self):
        from .export.gguf_quantize import check_quant

        for name in ("trials", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        for name, example in (("n_layer", "[12, 30]"), ("vocab", "[8192, 49152]")):
            span = getattr(self, name)
            if span and (len(span) != 2 or not 1 <= span[0] <= span[1]):
                raise ValueError(f"{name} = {span} must be [fewest, most] with 1 <= fewest <= most, e.g. {example}")
        if len(set(self.mend)) != len(self.mend):
            raise ValueError(f"mend = {self.mend} repeats a choice; list each once")
        if len(self.ffn_ratio) != 2 or not 0 < self.ffn_ratio[0] <= self.ffn_ratio[1] <= 1:
            raise ValueError(f"ffn_ratio = {self.ffn_ratio} must be [lowest, highest] in (0, 1], e.g. [0.5, 1.0]")
        if not 0 < self.ffn_step <= 1:
            raise ValueError(f"ffn_step = {self.ffn_step} must be in (0, 1], e.g. 0.125")
        if any(h < 1 for h in self.n_heads) or any(t < 1 for t in self.threads):
            raise ValueError(f"n_heads {self.n_heads} and threads {self.threads} must be positive integers")
        if not self.quants:
            raise ValueError('quants is empty; name at least one GGUF type, e.g. ["Q4_0"]')
        for q in self.quants:
            if q != ONNX_INT4:
                check_quant(q)  # names the valid types
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective = '{self.objective}' is unknown; use {' or '.join(OBJECTIVES)}")
        if self.objective == "accuracy" and self.eval_items == 0:
            raise ValueError("objective = 'accuracy' needs zero-shot items: set eval_items > 0, or objective = 'bpb'")
        for name in ("eval_items", "min_decode_tok_s", "max_memory_mb", "skip_margin"):
            if not getattr(self, name) >= 0 or getattr(self, name) == float("inf"):  # also NaN
                raise ValueError(f"{name} = {getattr(self, name)} must be a finite number, 0 or more")


# --- the space ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Space:
    """The search space resolved against the teacher."""

    n_layer: tuple[int, int]
    ffn_ratio: tuple[float, float]
    ffn_step: float
    n_heads: tuple[int, ...]  # empty: the recipe's
    quants: tuple[str, ...]
    threads: tuple[int, ...]
    vocab: tuple[int, ...] = ()  # (fewest, most) tokens kept; empty: the recipe's
    mend: tuple[str, ...] = ()  # empty: the recipe's

    def suggest(self, trial) -> dict:
        params = {"n_layer": trial.suggest_int("n_layer", *self.n_layer),
                  "ffn_ratio": trial.suggest_float("ffn_ratio", *self.ffn_ratio, step=self.ffn_step),
                  "quant": trial.suggest_categorical("quant", list(self.quants)),
                  "threads": trial.suggest_categorical("threads", list(self.threads))}
        if self.n_heads:
            params["n_heads"] = trial.suggest_categorical("n_heads", list(self.n_heads))
        if self.vocab:
            params["vocab"] = trial.suggest_int("vocab", *self.vocab, log=True)
        if self.mend:
            params["mend"] = trial.suggest_categorical("mend", list(self.mend))
        return params

    def contains(self, params: dict) -> bool:
        ratio = params["ffn_ratio"]
        steps = (ratio - self.ffn_ratio[0]) / self.ffn_step
        return (self.n_layer[0] <= params["n_layer"] <= self.n_layer[1] and params["quant"] in self.quants
                and self.ffn_ratio[0] <= ratio <= self.ffn_ratio[1] and abs(steps - round(steps)) < 1e-9
                and params["threads"] in self.threads and (not self.n_heads or params.get("n_heads") in self.n_heads)
                and (not self.vocab or self.vocab[0] <= params.get("vocab", 0) <= self.vocab[1])
                and (not self.mend or params.get("mend") in self.mend))


def resolve_space(cfg: SearchConfig, hf: dict, bench_threads: int) -> Space:
    """The space with its defaults filled in from the teacher's config; UsageError for a range outside it."""
    layers = hf["num_hidden_layers"]
    lo, hi = cfg.n_layer or (max(1, round(0.4 * layers)), layers)
    if hi > layers:
        raise UsageError(f"[search] n_layer = [{lo}, {hi}] goes past the teacher's {layers} layers; use at most "
                         f"[{lo}, {layers}]")
    if cfg.vocab and cfg.vocab[1] > hf["vocab_size"]:
        raise UsageError(f"[search] vocab = {cfg.vocab} goes past the teacher's {hf['vocab_size']} tokens; use at "
                         f"most [{cfg.vocab[0]}, {hf['vocab_size']}]")
    return Space((lo, hi), (cfg.ffn_ratio[0], cfg.ffn_ratio[1]), cfg.ffn_step, tuple(cfg.n_heads),
                 tuple(cfg.quants), tuple(cfg.threads) or (bench_threads,), tuple(cfg.vocab), tuple(cfg.mend))


def check_prune_axes(prune, space: Space) -> None:
    """UsageError, before any trial, when the recipe's [prune] does not take a searched vocab or mend value."""
    for name, values in (("vocab", space.vocab), ("mend", space.mend)):
        for value in values:
            try:
                dataclasses.replace(prune, **{name: value})
            except TypeError:
                raise UsageError(f"[search] {name}: this pistill's [prune] has no '{name}' option; remove "
                                 f"[search] {name}") from None
            except ValueError as e:
                raise UsageError(f"[search] {name} = {list(values)}: [prune] refuses {value!r}: {e}") from None


def trial_configs(rec, params: dict, cfg: SearchConfig, bench) -> dict:
    """The recipe's stage configs for one trial: its shape, a short healing distillation, its file type, its
    threads, the search's bench target and the search's zero-shot items."""
    prune = dataclasses.replace(rec.configs["prune"], n_layer=params["n_layer"], ffn_ratio=params["ffn_ratio"],
                                ffn_dim=None, target_params=None, **{k: params[k] for k in PRUNE_AXES if k in params})
    base = rec.configs["distill"]
    ckpt = min(base.ckpt_every or 4, max(1, cfg.steps // 2))
    grid = "int4" if params["quant"] == ONNX_INT4 else params["quant"].lower()
    qat = base.qat if base.qat == grid else "none"  # the QAT grid is one file type's
    distill = dataclasses.replace(base, steps=cfg.steps, warmup_steps=min(base.warmup_steps, cfg.steps // 4),
                                  eval_every=0, ckpt_every=ckpt, qat=qat)
    gguf, onnx = rec.configs["gguf"], dataclasses.replace(rec.configs["onnx"], precision="int4")
    if params["quant"] != ONNX_INT4:
        gguf, onnx = dataclasses.replace(gguf, quants=(params["quant"],)), rec.configs["onnx"]
    bench = dataclasses.replace(bench, threads=params["threads"], thread_sweep=[])
    evals = dataclasses.replace(rec.configs["eval"], items=cfg.eval_items) if cfg.eval_items else rec.configs["eval"]
    return {**rec.configs, "prune": prune, "distill": distill, "gguf": gguf, "onnx": onnx, "bench": bench,
            "eval": evals}


def params_key(params: dict) -> str:
    """A trial's folder name: the hash of its parameters (the same parameters, the same folder)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def describe_params(params: dict) -> str:
    heads = "".join(f", {params[k]} {unit}" for k, unit in (("n_heads", "heads"), ("vocab", "tokens")) if k in params)
    heads += f", mend {params['mend']}" if "mend" in params else ""
    return (f"{params['n_layer']} layers, MLP {params['ffn_ratio']:.3g}{heads}, {params['quant']}, "
            f"{params['threads']} thread{'s' if params['threads'] > 1 else ''}")


# --- shapes and predictions --------------------------------------------------------------------------------------

def vocab_rows(hf: dict, vocab: int | float | None) -> int:
    """The vocabulary rows a trial keeps: [prune] vocab as a count or a share of the teacher's (None: all)."""
    if vocab is None:
        return hf["vocab_size"]
    return min(round(vocab * hf["vocab_size"]) if isinstance(vocab, float) else int(vocab), hf["vocab_size"])


def shape_sizes(hf: dict, prune_cfg) -> dict:
    """The pruned shape of a trial and its parameter counts: all, vocabulary matrices (the rows [prune] vocab keeps),
    the rest, and the weights multiplied per token. InputError for an impossible shape (before any weight is
    touched)."""
    from .compress.prune import target_shape
    from .compress.shapes import param_count
    from .hf_folder import tied_embeddings

    shape = target_shape(hf, prune_cfg)
    rows = vocab_rows(hf, getattr(prune_cfg, "vocab", None))
    total = param_count(shape, {**hf, "vocab_size": rows})
    vocab = rows * shape.hidden
    embed = vocab * (1 if tied_embeddings(hf) else 2)  # tied: one matrix, the lookup table and the output projection
    matmul = total - (0 if tied_embeddings(hf) else vocab)  # the lookup table is not multiplied; a tied one is
    return {"shape": dataclasses.asdict(shape), "params": total, "embed_params": embed,
            "other_params": total - embed, "matmul_params": matmul, "vocab_share": rows / hf["vocab_size"]}


def predict(model, sizes: dict, params: dict) -> dict:
    """The predicted file bytes, decode / prefill tok/s and peak RSS of a trial."""
    nbytes = model.file_bytes(params["quant"], sizes["embed_params"], sizes["other_params"],
                              sizes.get("vocab_share", 1.0))
    if nbytes is None:
        return {"bytes": None, "decode_tps": None, "prefill_tps": None, "peak_rss_mb": None}
    return {"bytes": nbytes, **model.predict(nbytes, sizes["matmul_params"], params["threads"], params["quant"])}


def miss(figures: dict, cfg: SearchConfig, margin: float = 0.0) -> str | None:
    """Why figures ({"decode_tps", "peak_rss_mb"}) miss the budget by more than `margin` (a share), or None."""
    dec, rss = figures.get("decode_tps"), figures.get("peak_rss_mb")
    if cfg.min_decode_tok_s and dec is not None and dec < cfg.min_decode_tok_s * (1 - margin):
        return f"decode {dec:.1f} tok/s < {cfg.min_decode_tok_s:g}"
    if cfg.max_memory_mb and rss is not None and rss > cfg.max_memory_mb * (1 + margin):
        return f"peak memory {rss:.0f} MB > {cfg.max_memory_mb:g}"
    return None


def constraints(figures: dict, cfg: SearchConfig) -> dict[str, float]:
    """Optuna's constraint values (<= 0 is within the budget), in tok/s and MB."""
    dec, rss = figures.get("decode_tps") or 0.0, figures.get("peak_rss_mb") or 0.0
    return {"decode": cfg.min_decode_tok_s - dec if cfg.min_decode_tok_s else 0.0,
            "memory": rss - cfg.max_memory_mb if cfg.max_memory_mb else 0.0}


def set_constraints(trial, figures: dict, cfg: SearchConfig) -> None:
    """Tell the sampler how far the trial is from the budget (its constrained TPE favours feasible regions)."""
    for name, value in constraints(figures, cfg).items():
        trial.set_constraint(name, value)


# --- measurements ---------------------------------------------------------------------------------------------------

def device_results(bench: Artifact, key: str = "gguf") -> dict[str, dict]:
    """{target: the agent's result for `key`} of a bench artifact: each device of a fleet, or the one target."""
    devices = bench.path / "devices.json"
    if devices.is_file():
        found = json.loads(devices.read_text())
        return {spec: d["results"][key] for spec, d in found.items() if key in d.get("results", {})}
    result = json.loads(bench.file("bench.json").read_text()).get(key)
    return {bench.manifest.get("target") or "local": result} if result else {}


def measured(bench: Artifact, threads: int, key: str = "gguf") -> dict:
    """The slowest device's decode / prefill tok/s at `threads` for model `key`, the largest peak RSS and the
    smallest copy bandwidth; {"error"} when no device timed the model."""
    runs, errors = [], []
    for spec, r in device_results(bench, key).items():
        if "error" in r:
            errors.append(f"{spec}: {r['error']}")
            continue
        at = next((s for s in r.get("sweep") or [r] if s.get("threads", r.get("threads")) == threads), r)
        runs.append({"decode_tps": at["decode_tps"], "prefill_tps": at.get("prefill_tps"),
                     "peak_rss_mb": r.get("peak_rss_mb"), "bandwidth_gbs": (r.get("bandwidth") or {}).get("gbs"),
                     "bytes": (r.get("model") or {}).get("bytes")})
    if not runs:
        return {"error": "; ".join(errors) or "the bench timed no model"}
    pick = {"decode_tps": min, "prefill_tps": min, "peak_rss_mb": max, "bandwidth_gbs": min, "bytes": max}
    return {k: f([r[k] for r in runs if r[k] is not None]) if any(r[k] is not None for r in runs) else None
            for k, f in pick.items()}


def quality(export: Artifact, ev: Artifact | None) -> dict:
    """The exported file's held-out perplexity, KL and top-1 agreement against the teacher, and its zero-shot
    acc_norm per task with standard errors (from the eval artifact) and their mean."""
    from .zeroshot import read_eval

    m = export.metrics
    out = {"bpb": m.get("bpb"), "ppl": m.get("ppl"), "kl": m.get("kl"), "agreement": m.get("agreement"), "tasks": {}}
    result = read_eval(ev)["models"].get(export.stage) or {}
    for task, r in (result.get("tasks") or {}).items():
        out["tasks"][task] = {"acc_norm": r["acc_norm"], "stderr": r.get("acc_norm_stderr"), "n": r.get("n")}
    accs = [t["acc_norm"] for t in out["tasks"].values()]
    out["accuracy"] = sum(accs) / len(accs) if accs else None
    return out


def objective_value(q: dict, cfg: SearchConfig) -> float | None:
    v = q.get(cfg.objective)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def directions(cfg: SearchConfig) -> list[str]:
    return ["minimize" if cfg.objective in LOWER_IS_BETTER else "maximize", "maximize"]


def better(a: float, b: float, cfg: SearchConfig) -> bool:
    return a < b if cfg.objective in LOWER_IS_BETTER else a > b


# --- the run ------------------------------------------------------------------------------------------------------

@dataclass
class Search:
    """One search: the recipe, its options, the output folder, and what is built so far."""

    rec: object  # the Recipe
    cfg: SearchConfig
    out: Path
    bench: object = None  # the BenchConfig (target from the command line or the recipe)
    shared: dict = field(default_factory=dict)  # {stage: Artifact} built once for every trial: teacher, data
    hf: dict = field(default_factory=dict)  # the teacher's config.json
    model: object = None  # the SpeedModel
    references: list[dict] = field(default_factory=list)  # the teacher's own files, measured like trials

    def stage(self, name: str, arts: dict, cfgs: dict, folder: Path, inputs: tuple[str, ...] | None = None,
              force: bool = False):
        """Run (or reuse) one stage into `folder/<name>`, or into the shared folder when its key ignores the
        pruning (the distillation teacher of `source = "teacher"`): every trial then shares one artifact. When it
        must run on an input whose model a measured trial removed (`clean_trial`), that input is built again first
        (into `arts`)."""
        from . import pipeline
        from .artifact import input_key

        st = pipeline.stage(name)
        if inputs is not None:
            st = dataclasses.replace(st, inputs=inputs)
        reads = st.keyed(pipeline.named(st, arts), cfgs[name])
        if "prune" in st.inputs and "prune" not in reads:
            folder = self.out / "shared"
        old = pipeline.existing(folder / name)
        if force or old is None or old.key != input_key(name, cfgs[name], reads):
            for n in [n for n, a in reads.items() if model_removed(a)]:
                log.info("search: building %s of %s again (removed after its trial was measured)", n, folder)
                arts[n] = self.stage(n, arts, cfgs, folder, force=True)
        return pipeline.run_stage(st, arts, cfgs[name], folder / name, force=force)[0]

    def study_name(self, space: Space) -> str:
        """The study's name: a hash of what decides the trials' figures and the budget (not the trial count), so
        the same command continues the same study and a changed recipe or budget starts another."""
        basis = {n: config_dict(self.rec.configs[n]) for n in ("teacher", "data", "prune", "quantize", "distill",
                                                                "gguf", "eval")}
        search = {k: v for k, v in dataclasses.asdict(self.cfg).items()
                  if k not in ("trials", "confirm", "keep_trials")}
        bench = {k: v for k, v in config_dict(self.bench).items() if k not in ("threads", "thread_sweep")}
        blob = json.dumps([basis, search, dataclasses.asdict(space), bench], sort_keys=True, default=str)
        return "pistill-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    # -- before the first trial: the teacher, the data, and the teacher's own files as references ------------------

    def prepare(self) -> Space:
        from .models import read_config
        from .speedmodel import SpeedModel

        shared = self.out / "shared"
        arts: dict[str, Artifact] = {}
        for name in ("teacher", "data"):
            arts[name] = self.stage(name, arts, self.rec.configs, shared)
        self.shared, self.hf = arts, read_config(arts["teacher"].model_path())
        space = resolve_space(self.cfg, self.hf, self.bench.threads)
        check_prune_axes(self.rec.configs["prune"], space)
        self.model = SpeedModel()
        for quant in space.quants:
            self.references.append(self.reference(quant, space))
        return space

    def reference(self, quant: str, space: Space) -> dict:
        """The teacher's own file of `quant` (a GGUF type or ONNX_INT4), written, benchmarked at every thread count
        of the space and scored like a trial: the predictor's first points and a reference row of the report."""
        from .artifact import dir_bytes
        from .speedmodel import FileRates, Point, file_rates

        folder = self.out / "shared" / f"teacher-{quant}"
        export = export_stage(quant)
        cfgs = {"gguf": self.rec.configs["gguf"] if export == "onnx" else
                dataclasses.replace(self.rec.configs["gguf"], quants=(quant,)),
                "onnx": dataclasses.replace(self.rec.configs["onnx"], precision="int4"),
                "bench": dataclasses.replace(self.bench, threads=max(space.threads),
                                             thread_sweep=sorted(set(space.threads) - {max(space.threads)})),
                "eval": dataclasses.replace(self.rec.configs["eval"], items=self.cfg.eval_items)}
        log.info("search: the teacher's own %s file, the reference and the predictor's first point", quant)
        made = self.stage(export, {"distill": self.shared["teacher"], "data": self.shared["data"]}, cfgs, folder)
        bench = self.stage("bench", {export: made}, cfgs, folder, inputs=(export,))
        ev = self.stage("eval", {export: made}, cfgs, folder, inputs=(export,)) if self.cfg.eval_items else None
        sizes = shape_sizes(self.hf, dataclasses.replace(self.rec.configs["prune"], n_layer=None, ffn_ratio=1.0,
                                                          ffn_dim=None, n_heads=None, kv_heads=None, hidden=None,
                                                          target_params=None))
        nbytes = dir_bytes(made.model_path())
        self.model.rates[quant] = file_rates(made.model_path()) if export == "gguf" else FileRates(
            8 * nbytes / sizes["params"], 8 * nbytes / sizes["params"], 0)  # ONNX: one rate for every weight
        row = {"name": f"teacher {quant}", "quant": quant, "params": sizes["params"], "bytes": nbytes,
               "quality": quality(made, ev), "measured": {}}
        for t in space.threads:
            m = measured(bench, t, export)
            row["measured"][str(t)] = m
            if "error" in m:
                raise UserError(f"the teacher's {quant} file could not be benchmarked on {self.bench.fleet()}: "
                                f"{m['error']}; fix the target (pistill doctor TARGET) and rerun")
            self.model.bandwidth_gbs = self.model.bandwidth_gbs or m["bandwidth_gbs"]
            self.model.add(Point(row["bytes"], sizes["matmul_params"], t, quant, m["decode_tps"], m["prefill_tps"],
                                 m["peak_rss_mb"], row["name"]))
        return row

    # -- the trials ---------------------------------------------------------------------------------------------

    def run_trial(self, cfgs: dict, folder: Path, export: str) -> dict:
        """Build, benchmark and score one trial in `folder` (finished stages reused); `export` is "gguf" or
        "onnx"."""
        from .artifact import dir_bytes

        arts = dict(self.shared)
        for name in (*TRIAL_STAGES, export):
            arts[name] = self.stage(name, arts, cfgs, folder)
        bench = self.stage("bench", arts, cfgs, folder, inputs=(export,))
        ev = self.stage("eval", arts, cfgs, folder, inputs=(export,)) if self.cfg.eval_items else None
        m = measured(bench, cfgs["bench"].threads, export)
        built = [arts[n] for n in ("prune", "distill", export)] + [bench] + ([ev] if ev else [])
        return {"measured": m, "quality": quality(arts[export], ev), "bytes": dir_bytes(arts[export].model_path()),
                "wall_s": round(sum(a.manifest.get("wall_s", 0) for a in built), 1), "disk_bytes": dir_bytes(folder)}

    def first_params(self, space: Space) -> dict | None:
        """The recipe's own shape as the first trial, when the space holds it."""
        prune = self.rec.configs["prune"]
        quants = [q for q in self.rec.configs["gguf"].quants if q in space.quants]
        params = {"n_layer": prune.n_layer or self.hf["num_hidden_layers"], "ffn_ratio": prune.ffn_ratio,
                  "quant": quants[0] if quants else space.quants[0],
                  "threads": self.bench.threads if self.bench.threads in space.threads else space.threads[0]}
        if space.n_heads:
            params["n_heads"] = prune.n_heads if prune.n_heads in space.n_heads else space.n_heads[0]
        if space.vocab:
            params["vocab"] = min(max(vocab_rows(self.hf, prune.vocab), space.vocab[0]), space.vocab[1])
        if space.mend:
            params["mend"] = prune.mend if prune.mend in space.mend else space.mend[0]
        return params if space.contains(params) else None

    def loop(self, study, space: Space) -> None:
        from optuna.trial import TrialState

        from .speedmodel import Point

        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        for t in done:  # a rerun: the predictor learns again from every trial measured so far
            m, sizes = t.user_attrs["measured"], t.user_attrs["sizes"]
            self.model.add(Point(t.user_attrs["bytes"], sizes["matmul_params"], t.params["threads"], t.params["quant"],
                                 m["decode_tps"], m["prefill_tps"], m["peak_rss_mb"], f"trial {t.number}"))
        seen = {t.user_attrs["folder"]: t.number for t in done}
        if done:
            log.info("search: %d of %d trials already measured (reused)", len(done), self.cfg.trials)
        asks = 0
        while len(seen) < self.cfg.trials:
            if asks >= MAX_ASKS_PER_TRIAL * self.cfg.trials:
                raise UserError(f"search: {asks} proposals gave {len(seen)} trials to measure; the others were "
                                "predicted to miss the budget or repeated one: loosen --min-decode-tok-s / "
                                "--max-memory-mb or widen [search] n_layer / ffn_ratio / quants")
            asks += 1
            check_disk(self.out, trial_disk_bytes(study, self.out))
            self.one_trial(study, space, seen)

    def one_trial(self, study, space: Space, seen: dict) -> None:
        from optuna.trial import TrialState

        from .speedmodel import Point

        trial = study.ask()
        params = space.suggest(trial)
        key = params_key(params)
        cfgs = trial_configs(self.rec, params, self.cfg, self.bench)
        trial.set_user_attr("folder", key)
        if key in seen:
            trial.set_user_attr("skipped", f"the same parameters as trial {seen[key]}")
            study.tell(trial, state=TrialState.PRUNED)
            return
        try:
            sizes = shape_sizes(self.hf, cfgs["prune"])
        except UserError as e:
            trial.set_user_attr("error", f"impossible shape: {e}")
            study.tell(trial, state=TrialState.FAIL)
            return
        pred = predict(self.model, sizes, params)
        trial.set_user_attr("sizes", sizes)
        trial.set_user_attr("predicted", pred)
        n = len(seen) + 1
        if reason := miss(pred, self.cfg, self.cfg.skip_margin):
            trial.set_user_attr("skipped", f"predicted {reason}")
            set_constraints(trial, pred, self.cfg)
            log.info("search: skip %s: predicted %s", describe_params(params), reason)
            study.tell(trial, state=TrialState.PRUNED)
            return
        log.info("search: trial %d/%d (#%d) %s: predicted %s, decode %.1f tok/s, peak %.0f MB -> %s", n,
                 self.cfg.trials, trial.number, describe_params(params), _mb(pred["bytes"]), pred["decode_tps"] or 0,
                 pred["peak_rss_mb"] or 0, self.out / "trials" / key)
        try:
            result = self.run_trial(cfgs, self.out / "trials" / key, export_stage(params["quant"]))
        except UserError as e:
            trial.set_user_attr("error", " ".join(str(e).split()))
            log.warning("search: trial #%d failed: %s", trial.number, e)
            study.tell(trial, state=TrialState.FAIL)
            return
        m = result["measured"]
        value = objective_value(result["quality"], self.cfg)
        for k in ("measured", "quality", "bytes", "wall_s", "disk_bytes"):
            trial.set_user_attr(k, result[k])
        if "error" in m or value is None:
            trial.set_user_attr("error", m.get("error") or f"no {self.cfg.objective} measured")
            study.tell(trial, state=TrialState.FAIL)
            return
        self.model.add(Point(result["bytes"], sizes["matmul_params"], params["threads"], params["quant"],
                             m["decode_tps"], m["prefill_tps"], m["peak_rss_mb"], f"trial {trial.number}"))
        set_constraints(trial, m, self.cfg)
        study.tell(trial, [value, m["decode_tps"]])
        seen[key] = trial.number
        if not self.cfg.keep_trials:
            clean_trial(self.out / "trials" / key, export_stage(params["quant"]))
        log.info("search: trial %d/%d (#%d): %s %.3f, decode %.1f tok/s (predicted %.1f), peak %.0f MB%s", n,
                 self.cfg.trials, trial.number, self.cfg.objective, value, m["decode_tps"], pred["decode_tps"] or 0,
                 m["peak_rss_mb"] or 0, f" [misses the budget: {why}]" if (why := miss(m, self.cfg)) else "")


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f} MB" if n else "? MB"


# --- disk -----------------------------------------------------------------------------------------------------------

def model_removed(a: Artifact) -> bool:
    """Whether `clean_trial` removed an artifact's model (its manifest stays)."""
    if not a.model:
        return False
    path = a.model_path()  # an HF model is the artifact's folder itself
    return not (path / "config.json" if a.model["format"] == "hf" else path).exists()


def clean_trial(folder: Path, export: str) -> None:
    """Remove what a measured trial no longer needs: every file of its prune, quantize and distill artifacts but the
    manifest, and the export's GGUF files other than its model (the unquantized one). Manifests, the exported model
    and the bench and eval results stay, so a rerun reuses the trial's stages without rebuilding them."""
    from .pipeline import existing

    freed = 0
    for name in TRIAL_STAGES:
        for p in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if p.name != "manifest.json":
                freed += _remove(p)
    made = existing(folder / export)
    if made is not None and made.model and made.model["format"] == "gguf":
        for p in made.path.glob("*.gguf"):
            if p != made.model_path():
                freed += _remove(p)
    for name in (*TRIAL_STAGES, export):
        if (folder / name / MANIFEST).is_file():
            unlist_removed(folder / name)
    log.info("search: removed %s of intermediate files from %s (keep them with [search] keep_trials = true)",
             _mb(freed), folder)


def unlist_removed(folder: Path) -> None:
    """Rewrite an artifact's manifest to list only the files still there (and say what went), so that the check
    before each use (pipeline.run_stage) sees an intact, slimmed artifact rather than a damaged one."""
    mf = folder / MANIFEST
    manifest = read_manifest(mf)
    files = manifest.get("files", {})
    kept = {n: f for n, f in files.items() if (folder / n).is_file()}
    if len(kept) == len(files):
        return
    manifest["files"] = kept  # what went keeps its size and sha256 under "removed" (a rebuild can be compared)
    manifest["removed"] = {**manifest.get("removed", {}), **{n: f for n, f in files.items() if n not in kept}}
    atomic_write(mf, json.dumps(manifest, indent=2) + "\n")


def _remove(path: Path) -> int:
    from .artifact import dir_bytes

    n = dir_bytes(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return n


def trial_disk_bytes(study, out: Path) -> int:
    """The disk a trial is taken to need: the largest finished trial's folder (as it was before `clean_trial`),
    else DISK_PER_TRIAL."""
    from .artifact import dir_bytes

    sizes = [t.user_attrs.get("disk_bytes") or dir_bytes(out / "trials" / t.user_attrs.get("folder", "-"))
             for t in study.trials if t.state.name == "COMPLETE"]
    return max([n for n in sizes if n], default=DISK_PER_TRIAL)


def check_disk(out: Path, needed: int) -> None:
    """OutputError, before a trial is built, when `out`'s disk has less than `needed` bytes free."""
    free = shutil.disk_usage(out).free
    if free < needed:
        raise OutputError(f"search: {out} has {free / 1e6:.0f} MB free, but a trial needs about {needed / 1e6:.0f} MB "
                          "(the largest so far, before its clean-up); free some space or run the search with --out on "
                          "another disk (the finished trials are kept, and a rerun continues from them)")


def open_study(name: str, out: Path, cfg: SearchConfig):
    """The study in `<out>/study.db` (created, or loaded to continue); trials a killed run left running are marked
    failed and asked again with the same parameters (their finished stages are reused)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=max(4, cfg.trials // 3))
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name=name, load_if_exists=True,
                                directions=directions(cfg), sampler=sampler)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            log.info("search: trial #%d was interrupted; asking its parameters again", t.number)
            study.enqueue_trial(t.params)
    return study


# --- the result -----------------------------------------------------------------------------------------------------

def trial_rows(study, cfg: SearchConfig) -> list[dict]:
    """Every trial as a plain dict: parameters, state, prediction, measurement, quality, and the prediction's
    relative errors where the trial was measured."""
    from .speedmodel import relative_error

    rows = []
    for t in study.trials:
        a = t.user_attrs
        m, p = a.get("measured") or {}, a.get("predicted") or {}
        row = {"number": t.number, "params": t.params, "state": t.state.name.lower(), "folder": a.get("folder"),
               "sizes": a.get("sizes"), "predicted": p, "measured": m, "quality": a.get("quality"),
               "bytes": a.get("bytes"), "wall_s": a.get("wall_s"), "disk_bytes": a.get("disk_bytes"),
               "skipped": a.get("skipped"),
               "error": a.get("error") or ("interrupted; asked again" if t.state.name == "FAIL" else None)}
        if t.state.name == "COMPLETE":
            row["within"] = miss(m, cfg) is None
            row["prediction_error"] = {"bytes": relative_error(p.get("bytes"), a.get("bytes")),
                                       **{k: relative_error(p.get(k), m.get(k))
                                          for k in ("decode_tps", "prefill_tps", "peak_rss_mb")}}
        rows.append(row)
    return rows


def ranked(rows: list[dict], cfg: SearchConfig) -> list[dict]:
    """Measured trials within the budget, best `objective` first (faster first on a tie)."""
    ok = [r for r in rows if r["state"] == "complete" and miss(r["measured"], cfg) is None
          and objective_value(r["quality"], cfg) is not None]
    sign = 1 if cfg.objective in LOWER_IS_BETTER else -1
    return sorted(ok, key=lambda r: (sign * objective_value(r["quality"], cfg), -r["measured"]["decode_tps"]))


def front_keys(rows: list[dict], cfg: SearchConfig) -> list[int]:
    """The measured trials no other measured trial beats on both quality and decode speed."""
    from .front import dominates

    pts = {r["number"]: ((-1 if cfg.objective in LOWER_IS_BETTER else 1) * objective_value(r["quality"], cfg),
                         r["measured"]["decode_tps"])
           for r in rows if r["state"] == "complete" and objective_value(r["quality"], cfg) is not None}
    return [n for n, p in pts.items() if not any(dominates(q, p) for q in pts.values())]


def run_search(rec, cfg: SearchConfig, out: Path, bench) -> Path:
    """Run (or continue) the search into `out`; the path of `search.md`."""
    import time

    from .rundir import locked

    t0 = time.time()
    bench.check_devices()  # an unreachable, untrusted or python-less device fails now, not after the references
    with locked(out):
        s = Search(rec, cfg, out, bench)
        space = s.prepare()
        study = open_study(s.study_name(space), out, cfg)
        if not study.trials and (first := s.first_params(space)) is not None:
            study.enqueue_trial(first)  # the recipe's own shape first: a known point to compare with
        s.loop(study, space)
        return finish(s, study, space, time.time() - t0)


def confirm(s: Search, row: dict) -> dict:
    """The chosen trial's file benchmarked again (in `<out>/confirm/<trial folder>`; reused on a rerun)."""
    from . import pipeline

    export = export_stage(row["params"]["quant"])
    made = pipeline.existing(s.out / "trials" / row["folder"] / export)
    cfgs = trial_configs(s.rec, row["params"], s.cfg, s.bench)
    log.info("search: benchmarking trial #%d again to confirm it meets the budget", row["number"])
    bench = s.stage("bench", {export: made}, cfgs, s.out / "confirm" / row["folder"], inputs=(export,))
    return measured(bench, row["params"]["threads"], export)


def finish(s: Search, study, space: Space, wall_s: float) -> Path:
    """Choose, confirm, and write best.toml, search.json, search.md and search.html."""
    from . import recipe
    from .pipeline import write_json, write_text
    from .search_report import render_html, render_md

    rows = trial_rows(study, s.cfg)
    chosen = None
    for row in ranked(rows, s.cfg)[:3]:  # a chosen model that misses on its rerun gives way to the next
        if s.cfg.confirm:
            row["confirm"] = confirm(s, row)
            if miss(row["confirm"], s.cfg) is not None or "error" in row["confirm"]:
                log.warning("search: trial #%d missed the budget on its rerun (%s)", row["number"],
                            miss(row["confirm"], s.cfg) or row["confirm"].get("error"))
                continue
        chosen = row
        break
    best = None
    if chosen is not None:
        cfgs = trial_configs(s.rec, chosen["params"], s.cfg, s.bench)
        rec = recipe.Recipe(f"{s.rec.name}-best", str(s.out / "best"), cfgs)
        best = s.out / "best.toml"
        write_text(best, f"# pistill search: trial #{chosen['number']} ({describe_params(chosen['params'])}), "
                          f"from {s.rec.path or 'the recipe'}\n" + recipe.dumps(rec))
    doc = {"schema_version": 1, "recipe": str(s.rec.path) if s.rec.path else None, "targets": s.bench.fleet(),
           "config": dataclasses.asdict(s.cfg), "space": dataclasses.asdict(space), "objective": s.cfg.objective,
           "chosen": chosen["number"] if chosen else None, "best_recipe": str(best) if best else None,
           "wall_s": round(wall_s, 1), "front": front_keys(rows, s.cfg), "references": s.references, "trials": rows,
           "predictor": s.model.describe(list(space.threads), list(space.quants))}
    write_json(s.out / "search.json", doc)
    write_text(s.out / "search.md", render_md(doc))
    write_text(s.out / "search.html", render_html(doc))
    if chosen is None:
        log.warning("search: no measured trial meets the budget; see %s", s.out / "search.md")
    return s.out / "search.md"
