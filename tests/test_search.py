"""`pistill search`: the predictor's fits, the space and budget checks, and real searches on a tiny llama (this
machine, a loopback sshd device and a fleet of two): trials built, measured and reused, a killed search continued,
and best.toml giving the chosen trial's configs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sshd import sshd_factory  # noqa: F401 (fixture)

from pistill import recipe
from pistill.search import (SearchConfig, constraints, measured, miss, params_key, resolve_space,
                            trial_configs)
from pistill.speedmodel import FileRates, Point, SpeedModel, fit, relative_error

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = """
name = "tiny"
out = "{out}"
[teacher]
source = "{model}"
[data]
block_size = 64
calib_blocks = 4
train_blocks = 16
heldout_blocks = 2
instructions = 0
generate = 0
topk = 16
[prune]
calib_blocks = 2
n_layer = 3
ffn_ratio = 0.5
[quantize]
method = "none"
bench_blocks = 1
[distill]
batch_size = 2
eval_blocks = 1
[gguf]
quants = ["Q4_0"]
verify = false
[bench]
prompt_tokens = [16]
gen_tokens = 8
repeats = 1
warmup = 0
cooldown_s = 0
bandwidth_mb = 4
threads = 1
[eval]
tasks = ["arc_easy"]
[search]
trials = {trials}
steps = {steps}
n_layer = [2, 4]
quants = ["Q4_0", "Q8_0"]
eval_items = 5
threads = [1]
"""


# --- the predictor --------------------------------------------------------------------------------------------------

def test_fit_uses_the_prior_then_one_point_then_least_squares():
    assert fit([], [], None) is None
    prior = fit([], [], 2e-9)
    assert prior.how == "prior" and prior(1e8) == pytest.approx(0.2)
    one = fit([1e8], [0.01], 2e-9)
    assert one.a == 0 and one(2e8) == pytest.approx(0.02)  # through the origin and the point
    two = fit([1e8, 2e8], [0.011, 0.021], None)
    assert two.a == pytest.approx(0.001) and two.b == pytest.approx(1e-10)
    falling = fit([1e8, 1.01e8], [0.02, 0.01], None)  # noise tilting the line the wrong way
    assert falling.how.startswith("through the origin") and falling.b > 0


def test_speed_model_predicts_from_bandwidth_then_from_measurements_per_type():
    model = SpeedModel(bandwidth_gbs=20.0)
    p = model.predict(100_000_000, 100_000_000, threads=2, quant="Q4_0")
    assert p["decode_tps"] == pytest.approx(0.5 * 20e9 / 1e8)  # half the copy bandwidth, no points yet
    assert p["prefill_tps"] is None and p["peak_rss_mb"] == pytest.approx(100 + 250)
    model.add(Point(100_000_000, 1e8, 2, "Q4_0", decode_tps=80.0, prefill_tps=400.0, peak_rss_mb=350.0))
    # one point of the type: through the origin and that point
    assert model.predict(50_000_000, 5e7, 2, "Q4_0")["decode_tps"] == pytest.approx(160.0)
    model.add(Point(50_000_000, 5e7, 2, "Q4_0", decode_tps=150.0, prefill_tps=780.0, peak_rss_mb=300.0))
    p = model.predict(75_000_000, 7.5e7, threads=2, quant="Q4_0")
    assert 80 < p["decode_tps"] < 150 and 400 < p["prefill_tps"] < 780 and p["peak_rss_mb"] == pytest.approx(325)
    assert model.decode_line(2, "Q4_0").how == "least squares on 2 points"
    # another type without points of its own borrows the others' through the origin; another thread count, the prior
    assert model.decode_line(2, "Q8_0").how.startswith("other types")
    assert model.predict(75_000_000, 7.5e7, threads=1, quant="Q4_0")["decode_tps"] == pytest.approx(0.5 * 20e9 / 7.5e7)
    assert relative_error(110, 100) == pytest.approx(0.1) and relative_error(None, 100) is None


# --- the budget, the space and the config ---------------------------------------------------------------------------

def test_budget_checks_and_constraints():
    cfg = SearchConfig(min_decode_tok_s=100, max_memory_mb=500)
    assert miss({"decode_tps": 101, "peak_rss_mb": 400}, cfg) is None
    assert "decode 90.0 tok/s < 100" in miss({"decode_tps": 90, "peak_rss_mb": 400}, cfg)
    assert miss({"decode_tps": 90, "peak_rss_mb": 400}, cfg, margin=0.15) is None  # within the skip margin
    assert "peak memory 600 MB > 500" in miss({"decode_tps": 120, "peak_rss_mb": 600}, cfg)
    assert constraints({"decode_tps": 90, "peak_rss_mb": 400}, cfg) == {"decode": 10, "memory": -100}
    assert constraints({"decode_tps": 90}, SearchConfig()) == {"decode": 0.0, "memory": 0.0}


@pytest.mark.parametrize("kwargs,words", [
    ({"trials": 0}, "trials = 0 must be at least 1"),
    ({"n_layer": [10, 5]}, "n_layer = [10, 5] must be [fewest, most]"),
    ({"ffn_ratio": [0.5, 1.5]}, "ffn_ratio = [0.5, 1.5] must be [lowest, highest] in (0, 1]"),
    ({"quants": ["Q4_Z"]}, "Q4_Z"),
    ({"quants": []}, "quants is empty"),
    ({"objective": "speed"}, "objective = 'speed' is unknown"),
    ({"objective": "accuracy", "eval_items": 0}, "needs zero-shot items"),
    ({"min_decode_tok_s": -1}, "min_decode_tok_s = -1 must be a finite number, 0 or more"),
    ({"vocab": [9000, 8000]}, "vocab = [9000, 8000] must be [fewest, most]"),
    ({"vocab": [8192]}, "vocab = [8192] must be [fewest, most]"),
    ({"mend": ["none", "none"]}, "mend = ['none', 'none'] repeats a choice"),
])
def test_config_errors_name_the_key(kwargs, words):
    with pytest.raises(ValueError) as e:
        SearchConfig(**kwargs)
    assert words in str(e.value)


def test_space_defaults_come_from_the_teacher_and_out_of_range_is_refused():
    hf = {"num_hidden_layers": 30}
    space = resolve_space(SearchConfig(), hf, bench_threads=2)
    assert space.n_layer == (12, 30) and space.threads == (2,) and space.quants == ("Q4_0", "Q4_K_M", "Q8_0")
    assert space.contains({"n_layer": 21, "ffn_ratio": 0.625, "quant": "Q4_0", "threads": 2})
    assert not space.contains({"n_layer": 21, "ffn_ratio": 0.6, "quant": "Q4_0", "threads": 2})  # off the step
    with pytest.raises(Exception, match="past the teacher's 30 layers"):
        resolve_space(SearchConfig(n_layer=[4, 40]), hf, 2)


def test_recipe_search_table_and_dump_round_trip(tmp_path):
    import tomllib

    rec = recipe.load(ROOT / "recipes" / "default.toml")
    assert rec.search.trials == 12 and rec.search.quants == ["Q4_0", "Q4_K_M", "Q8_0"]
    again = recipe.from_dict(tomllib.loads(recipe.dumps(rec)))
    assert again.configs == rec.configs and again.name == rec.name and again.out == rec.out
    with pytest.raises(recipe.RecipeError, match=r"\[search\] unknown key 'trails' \(did you mean 'trials'\?\)"):
        recipe.from_dict({"search": {"trails": 3}})
    with pytest.raises(recipe.RecipeError, match=r"\[search\] steps = 0 must be at least 1"):
        recipe.from_dict({"search": {"steps": 0}})


def test_trial_configs_change_only_the_searched_options():
    rec = recipe.load(ROOT / "recipes" / "default.toml")
    params = {"n_layer": 18, "ffn_ratio": 0.75, "quant": "Q8_0", "threads": 1}
    cfgs = trial_configs(rec, params, rec.search, rec.configs["bench"])
    assert (cfgs["prune"].n_layer, cfgs["prune"].ffn_ratio, cfgs["gguf"].quants) == (18, 0.75, ("Q8_0",))
    assert cfgs["distill"].steps == rec.search.steps and cfgs["distill"].qat == "none"  # the QAT grid is Q4_0's
    assert cfgs["bench"].threads == 1 and cfgs["eval"].items == rec.search.eval_items
    for name in ("teacher", "data", "quantize", "onnx", "baseline"):
        assert cfgs[name] == rec.configs[name]
    q4 = trial_configs(rec, {**params, "quant": "Q4_0"}, rec.search, rec.configs["bench"])
    assert q4["distill"].qat == "q4_0"
    assert params_key(params) == params_key(dict(reversed(params.items()))) != params_key({**params, "threads": 2})


SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "model_type": "llama"}


def test_vocab_and_mend_axes_reach_the_trials_prune_table():
    """[search] vocab and mend: sampled in the space, passed to the trial's [prune] and written in its recipe."""
    import tomllib

    from optuna.trial import FixedTrial

    from pistill.search import describe_params

    cfg = SearchConfig(vocab=[8192, 49152], mend=["none", "linear"])
    space = resolve_space(cfg, SMOLLM2, bench_threads=2)
    assert space.vocab == (8192, 49152) and space.mend == ("none", "linear")
    params = space.suggest(FixedTrial({"n_layer": 20, "ffn_ratio": 0.75, "quant": "Q4_0", "threads": 2,
                                       "vocab": 12000, "mend": "linear"}))
    assert params["vocab"] == 12000 and params["mend"] == "linear" and space.contains(params)
    assert not space.contains({**params, "vocab": 4096}) and not space.contains({**params, "mend": "cubic"})
    assert "12000 tokens, mend linear" in describe_params(params)
    rec = recipe.load(ROOT / "recipes" / "default.toml")
    cfgs = trial_configs(rec, params, cfg, rec.configs["bench"])
    doc = tomllib.loads(recipe.dumps(recipe.Recipe("trial", "runs/trial", cfgs)))
    assert (doc["prune"]["vocab"], doc["prune"]["mend"], doc["prune"]["n_layer"]) == (12000, "linear", 20)
    plain = trial_configs(rec, {k: params[k] for k in ("n_layer", "ffn_ratio", "quant", "threads")}, cfg,
                          rec.configs["bench"])
    assert (plain["prune"].vocab, plain["prune"].mend) == (rec.configs["prune"].vocab, rec.configs["prune"].mend)
    with pytest.raises(Exception, match="goes past the teacher's 49152 tokens"):
        resolve_space(SearchConfig(vocab=[8192, 65536]), SMOLLM2, 2)


def test_searched_prune_values_are_checked_before_any_trial():
    from pistill.compress.prune import PruneConfig
    from pistill.errors import UsageError
    from pistill.search import check_prune_axes

    space = resolve_space(SearchConfig(mend=["none", "cubic"]), SMOLLM2, 2)
    with pytest.raises(UsageError, match=r"\[search\] mend = \['none', 'cubic'\]: \[prune\] refuses 'cubic'"):
        check_prune_axes(PruneConfig(), space)

    @dataclasses.dataclass(frozen=True)
    class OldPrune:  # a [prune] from before the option
        n_layer: int | None = None

    with pytest.raises(UsageError, match="has no 'vocab' option"):
        check_prune_axes(OldPrune(), resolve_space(SearchConfig(vocab=[8192, 16384]), SMOLLM2, 2))
    check_prune_axes(PruneConfig(), resolve_space(SearchConfig(vocab=[8192, 16384], mend=["none"]), SMOLLM2, 2))


@pytest.mark.parametrize("vocab, rows", [(None, 49152), (8192, 8192), (0.25, 12288)])
def test_predicted_bytes_scale_with_the_vocabulary_kept(vocab, rows):
    """The tied embedding is one matrix of `rows` rows, read for every token: it and the tokenizer in the header
    shrink with [prune] vocab, the other weights do not."""
    from pistill.compress.prune import PruneConfig
    from pistill.search import predict, shape_sizes

    full = shape_sizes(SMOLLM2, PruneConfig(n_layer=20, ffn_ratio=0.75))
    sizes = shape_sizes(SMOLLM2, PruneConfig(n_layer=20, ffn_ratio=0.75, vocab=vocab))
    assert sizes["embed_params"] == rows * 576 and sizes["other_params"] == full["other_params"]
    assert sizes["params"] == full["params"] - (49152 - rows) * 576 and sizes["vocab_share"] == rows / 49152
    assert sizes["matmul_params"] == sizes["params"]  # tied: the output projection is multiplied per token
    model = SpeedModel(rates={"Q4_0": FileRates(embed_bpw=8.5, other_bpw=4.5, header_bytes=1_000_000)},
                       bandwidth_gbs=10.0)
    got, base = (predict(model, s, {"quant": "Q4_0", "threads": 2}) for s in (sizes, full))
    assert base["bytes"] - got["bytes"] == pytest.approx((49152 - rows) * 576 * 8.5 / 8 + 1e6 * (1 - rows / 49152),
                                                         abs=2)
    assert got["decode_tps"] >= base["decode_tps"]


def test_disk_estimate_and_check(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from pistill.errors import OutputError
    from pistill.search import DISK_PER_TRIAL, check_disk, trial_disk_bytes

    def trial(state, **attrs):
        return SimpleNamespace(state=SimpleNamespace(name=state), user_attrs=attrs)

    (tmp_path / "trials" / "old").mkdir(parents=True)
    (tmp_path / "trials" / "old" / "model.bin").write_bytes(b"x" * 5000)
    assert trial_disk_bytes(SimpleNamespace(trials=[trial("FAIL", folder="x")]), tmp_path) == DISK_PER_TRIAL
    study = SimpleNamespace(trials=[trial("COMPLETE", folder="a", disk_bytes=3000), trial("PRUNED", disk_bytes=10**9),
                                    trial("COMPLETE", folder="old")])  # from before disk_bytes: its folder
    assert trial_disk_bytes(study, tmp_path) == 5000
    check_disk(tmp_path, 5000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 4_000_000,
                                                                         free=4_000_000))
    with pytest.raises(OutputError) as err:
        check_disk(tmp_path, 1_200_000_000)
    msg = str(err.value)
    assert f"{tmp_path} has 4 MB free, but a trial needs about 1200 MB" in msg and "--out" in msg and "\n" not in msg


def test_quantize_of_the_original_teacher_ignores_the_pruning(tiny_teacher, tiny_data, tmp_path):
    """The distillation teacher (`source = "teacher"`) is not quantized again when only the pruning changed; with
    `source = "pruned"` it is."""
    from pistill import pipeline
    from pistill.compress.prune import PruneConfig
    from pistill.compress.quantize import QuantizeConfig

    st = pipeline.stage("quantize")
    arts = {"teacher": tiny_teacher, "data": tiny_data}
    prunes = [pipeline.run_stage(pipeline.stage("prune"), arts, PruneConfig(ffn_ratio=r, calib_blocks=2),
                                 tmp_path / f"prune{r}", False)[0] for r in (0.5, 0.75)]
    cfg = QuantizeConfig(method="none", bench_blocks=1)
    q1, ran1 = pipeline.run_stage(st, {**arts, "prune": prunes[0]}, cfg, tmp_path / "quantize", False)
    q2, ran2 = pipeline.run_stage(st, {**arts, "prune": prunes[1]}, cfg, tmp_path / "quantize", False)
    assert ran1 and not ran2 and q1.id == q2.id
    assert [p["stage"] for p in q1.manifest["parents"]] == ["teacher", "data"]
    pruned = dataclasses.replace(cfg, source="pruned")
    _, ran3 = pipeline.run_stage(st, {**arts, "prune": prunes[0]}, pruned, tmp_path / "quantize", False)
    _, ran4 = pipeline.run_stage(st, {**arts, "prune": prunes[1]}, pruned, tmp_path / "quantize", False)
    assert ran3 and ran4


# --- real searches on the tiny llama --------------------------------------------------------------------------------

def write_recipe(tmp: Path, model: Path, trials: int = 3, steps: int = 2) -> Path:
    path = tmp / "tiny.toml"
    path.write_text(TINY_RECIPE.format(out=tmp / "run", model=model, trials=trials, steps=steps))
    return path


def pistill(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A tiny random llama with 4 layers and a 256-wide MLP: room for layer and MLP pruning."""
    from tiny import make_model

    return make_model(tmp_path_factory.mktemp("deep") / "model", ffn_dim=256, n_layer=4)


@pytest.fixture(scope="module")
def searched(deep_model, tmp_path_factory):
    """A 3-trial search on this machine, with a budget every trial of the tiny model meets."""
    tmp = tmp_path_factory.mktemp("search")
    path = write_recipe(tmp, deep_model)
    p = pistill("search", str(path), "--target", "local", "--min-decode-tok-s", "5", "--out", str(tmp / "s"))
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, path, Path(p.stdout.strip().splitlines()[-1])


def test_search_measures_trials_and_writes_the_chosen_recipe(searched):
    tmp, path, md = searched
    out = tmp / "s"
    assert md == out / "search.md" and md.is_file()
    doc = json.loads((out / "search.json").read_text())
    done = [t for t in doc["trials"] if t["state"] == "complete"]
    assert len(done) == 3 and doc["trials"][0]["params"] == {"n_layer": 3, "ffn_ratio": 0.5, "quant": "Q4_0",
                                                             "threads": 1}  # the recipe's own shape first
    for t in done:
        assert t["measured"]["decode_tps"] > 0 and t["measured"]["peak_rss_mb"] > 0 and t["quality"]["ppl"] > 1
        assert t["predicted"]["decode_tps"] > 0 and t["prediction_error"]["decode_tps"] is not None
        assert abs(t["prediction_error"]["bytes"]) < 0.05  # file bytes from the teacher files' bits per weight
        assert (out / "trials" / t["folder"] / "gguf" / "manifest.json").is_file()
        assert set(t["quality"]["tasks"]) == {"arc_easy"} and t["quality"]["tasks"]["arc_easy"]["n"] == 5
    assert [r["name"] for r in doc["references"]] == ["teacher Q4_0", "teacher Q8_0"]
    chosen = next(t for t in done if t["number"] == doc["chosen"])
    assert chosen["within"] and chosen["confirm"]["decode_tps"] >= 5
    best = min(done, key=lambda t: t["quality"]["ppl"])
    assert chosen["number"] == best["number"]  # every trial meets this budget: the lowest perplexity wins
    # best.toml holds exactly the chosen trial's configs
    rec = recipe.load(path)
    again = recipe.load(out / "best.toml")
    assert again.configs == trial_configs(rec, chosen["params"], rec.search, rec.configs["bench"])
    html = (out / "search.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and f"Chosen: trial #{chosen['number']}" in html
    assert "| teacher Q4_0 |" in md.read_text()


def test_measured_trials_keep_only_manifests_and_the_exported_file(searched):
    from pistill.artifact import dir_bytes

    tmp, _, _ = searched
    out = tmp / "s"
    done = [t for t in json.loads((out / "search.json").read_text())["trials"] if t["state"] == "complete"]
    for t in done:
        folder = out / "trials" / t["folder"]
        for stage in ("prune", "distill"):
            assert [p.name for p in (folder / stage).iterdir()] == ["manifest.json"]
        assert [p.name for p in (folder / "gguf").glob("*.gguf")] == [f"model-{t['params']['quant']}.gguf"]
        assert (folder / "bench" / "bench.json").is_file() and (folder / "eval" / "manifest.json").is_file()
        assert t["disk_bytes"] > dir_bytes(folder) > 0  # measured before the clean-up


def test_short_disk_stops_the_search_before_a_trial(searched, monkeypatch, caplog):
    """Too little free space for another trial: one line naming the folder and the fix; the measured trials stay."""
    import shutil
    from types import SimpleNamespace

    from pistill.errors import OutputError
    from pistill.search import run_search

    tmp, path, _ = searched
    out = tmp / "s"
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")}
    rec = recipe.load(path)
    bench = dataclasses.replace(rec.configs["bench"], target="local", targets=[], inventory="")  # as --target local
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=1000))
    with caplog.at_level("INFO", logger="pistill.search"), pytest.raises(OutputError) as err:
        run_search(rec, dataclasses.replace(rec.search, trials=4, min_decode_tok_s=5.0), out, bench)
    assert f"{out} has 0 MB free" in str(err.value) and "--out on another disk" in str(err.value)
    assert "3 of 4 trials already measured" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")} == before


def test_cleaned_trials_are_reused_and_rebuilt_only_when_a_later_stage_needs_them(searched, tmp_path):
    """A new study over the same folder (study.db gone) reuses a cleaned trial from its manifests; after a [gguf]
    change the trial's export runs again, and its removed distilled and pruned models are built again first
    (kept this time: keep_trials)."""
    import shutil

    src, path, _ = searched
    out = tmp_path / "s"
    shutil.copytree(src / "s", out)
    (out / "study.db").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")}
    args = ("search", str(path), "--target", "local", "--min-decode-tok-s", "5", "--trials", "1", "--out", str(out))
    p = pistill(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "again (removed" not in p.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")} == before
    (first,) = [t for t in json.loads((out / "search.json").read_text())["trials"] if t["state"] == "complete"]
    folder = out / "trials" / first["folder"]
    old_prune = json.loads((folder / "prune" / "manifest.json").read_text())["id"]
    changed = tmp_path / "changed.toml"
    changed.write_text(path.read_text().replace("verify = false", "verify = false\nimatrix = false")
                       .replace("[search]", "[search]\nkeep_trials = true"))
    p = pistill(args[0], str(changed), *args[2:])
    assert p.returncode == 0, p.stderr[-3000:]
    log = " ".join(p.stderr.split())
    assert "building distill of" in log and "building prune of" in log
    assert json.loads((folder / "prune" / "manifest.json").read_text())["id"] != old_prune
    assert (folder / "distill" / "model.safetensors").is_file() and (folder / "gguf" / "model-f16.gguf").is_file()
    doc = json.loads((out / "search.json").read_text())
    assert [t["folder"] for t in doc["trials"] if t["state"] == "complete"] == [first["folder"]]


def test_rerun_reuses_every_trial(searched):
    tmp, path, _ = searched
    out = tmp / "s"
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")}
    t0 = time.time()
    p = pistill("search", str(path), "--target", "local", "--min-decode-tok-s", "5", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3 of 3 trials already measured" in " ".join(p.stderr.split())
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/manifest.json")} == before
    assert time.time() - t0 < 60


def test_impossible_budget_fails_with_one_line(searched):
    tmp, path, _ = searched
    p = pistill("search", str(path), "--min-decode-tok-s", "1e9", "--out", str(tmp / "impossible"))
    assert p.returncode == 1
    assert "predicted to miss the budget" in p.stderr and "loosen --min-decode-tok-s" in p.stderr
    assert not (tmp / "impossible" / "best.toml").exists()


def test_killed_search_continues_from_its_finished_stages(deep_model, tmp_path):
    path = write_recipe(tmp_path, deep_model, trials=3, steps=6)
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "pistill.cli", "search", str(path), "--min-decode-tok-s", "5",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("trials/*/prune/manifest.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the second trial is pruned, not measured
    proc.wait()
    pruned = {p.parent.parent.name: json.loads(p.read_text())["id"] for p in out.glob("trials/*/prune/manifest.json")}
    assert len(pruned) == 2
    p = pistill("search", str(path), "--min-decode-tok-s", "5", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "was interrupted; asking its parameters again" in " ".join(p.stderr.split())
    doc = json.loads((out / "search.json").read_text())
    assert sum(t["state"] == "complete" for t in doc["trials"]) == 3
    for folder, ident in pruned.items():  # the interrupted trial's prune artifact was reused, not rebuilt
        assert json.loads((out / "trials" / folder / "prune" / "manifest.json").read_text())["id"] == ident
    assert any(t["state"] == "fail" and "interrupted" in t["error"] for t in doc["trials"])


def test_onnx_int4_trials(deep_model, tmp_path):
    """"onnx-int4" in the space: the trial is exported with the ONNX builder and timed in onnxruntime."""
    path = write_recipe(tmp_path, deep_model, trials=1)
    path.write_text(path.read_text().replace('quants = ["Q4_0", "Q8_0"]', 'quants = ["onnx-int4"]'))
    p = pistill("search", str(path), "--min-decode-tok-s", "5", "--out", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    (trial,) = [t for t in doc["trials"] if t["state"] == "complete"]
    folder = tmp_path / "s" / "trials" / trial["folder"]
    assert (folder / "onnx" / "manifest.json").is_file() and not (folder / "gguf").exists()
    assert trial["measured"]["decode_tps"] > 0 and trial["quality"]["ppl"] > 1 and trial["quality"]["tasks"]
    assert [r["name"] for r in doc["references"]] == ["teacher onnx-int4"]
    assert recipe.load(tmp_path / "s" / "best.toml").configs["onnx"].precision == "int4"


def test_pistill_run_of_best_toml_reproduces_the_trial(searched):
    """`pistill run best.toml` builds the chosen model again: the same student weights and the same GGUF bytes."""
    tmp, _, _ = searched
    out = tmp / "s"
    doc = json.loads((out / "search.json").read_text())
    chosen = next(t for t in doc["trials"] if t["number"] == doc["chosen"])
    p = pistill("run", str(out / "best.toml"), "--out", str(tmp / "again"))
    assert p.returncode == 0, p.stderr[-3000:]
    trial = out / "trials" / chosen["folder"]
    for stage in ("prune", "distill"):
        a, b = ({**m["files"], **m.get("removed", {})}  # a measured trial's manifest lists what it removed
                for m in (json.loads((d / stage / "manifest.json").read_text()) for d in (trial, tmp / "again")))
        assert a["model.safetensors"]["sha256"] == b["model.safetensors"]["sha256"], stage


# --- on devices over SSH --------------------------------------------------------------------------------------------

def test_search_on_a_fleet_of_two_ssh_devices(deep_model, sshd_factory, tmp_path, monkeypatch):
    """Every trial is benchmarked on both loopback devices (in parallel, by the bench stage); the budget is judged on
    the slower one."""
    from test_fleet import trusted

    from pistill.artifact import Artifact
    from pistill.search import run_search

    a, b = trusted(sshd_factory("a", own_home=True), sshd_factory("b", own_home=True), tmp_path=tmp_path,
                   monkeypatch=monkeypatch)
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "local-cache"))
    rec = recipe.load(write_recipe(tmp_path, deep_model, trials=2))
    bench = dataclasses.replace(rec.configs["bench"], target="local", targets=[a.spec, b.spec], timeout_s=120,
                                python=sys.executable, remote_cache="~/.cache/pistill")
    md = run_search(rec, dataclasses.replace(rec.search, min_decode_tok_s=5), tmp_path / "s", bench)
    doc = json.loads(md.with_name("search.json").read_text())
    assert doc["targets"] == [a.spec, b.spec]
    done = [t for t in doc["trials"] if t["state"] == "complete"]
    assert len(done) == 2
    for t in done:
        art = Artifact.load(tmp_path / "s" / "trials" / t["folder"] / "bench")
        devices = json.loads(art.file("devices.json").read_text())
        speeds = [d["results"]["gguf"]["decode_tps"] for d in devices.values()]
        assert len(speeds) == 2 and t["measured"]["decode_tps"] == pytest.approx(min(speeds))
        assert measured(art, 1)["decode_tps"] == pytest.approx(min(speeds))


def test_search_checks_every_device_before_building_anything(sshd_factory, tmp_path, monkeypatch):
    """An untrusted or non-SSH device fails the search in seconds, before the teacher or a reference file is built
    (it used to fail after minutes of building); a python that does not run fails the same way."""
    from test_fleet import trusted
    from test_target import not_ssh

    from pistill.device.target import TargetError
    from pistill.search import run_search

    (up,) = trusted(sshd_factory("up"), tmp_path=tmp_path, monkeypatch=monkeypatch)
    rec = recipe.from_dict({})
    ok = dataclasses.replace(rec.configs["bench"], targets=[up.spec], python=sys.executable)
    assert ok.check_devices()[up.spec]["python"]["executable"] == sys.executable  # trusted: facts, nothing raised
    with pytest.raises(TargetError, match=rf"^{up.spec}: /no/python is not there or does not run; install python3"):
        dataclasses.replace(ok, python="/no/python").check_devices()
    (tmp_path / "known_hosts").write_text("")  # reachable, but its host key is no longer trusted
    with not_ssh(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        bench = dataclasses.replace(ok, targets=[up.spec, f"pi@127.0.0.1:{port}"])
        t0 = time.monotonic()
        with pytest.raises(TargetError) as err:
            run_search(rec, rec.search, tmp_path / "s", bench)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "s").exists()  # nothing built, no folder made
    msg = str(err.value)
    assert msg.startswith("2 of 2 devices cannot be used: ") and "\n" not in msg
    assert f"pistill trust {up.spec} --accept-host-key SHA256:" in msg
    assert f"pi@127.0.0.1:{port} accepted a TCP connection but did not answer as an SSH server" in msg


def test_cli_search_on_a_host_that_does_not_speak_ssh(tmp_path):
    from test_target import not_ssh

    (tmp_path / "r.toml").write_text('name = "r"\n')
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    with not_ssh(b"SMTP ready\r\n") as port:
        p = subprocess.run([sys.executable, "-m", "pistill.cli", "search", str(tmp_path / "r.toml"), "--target",
                            f"pi@127.0.0.1:{port}", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "paramiko" not in p.stderr, p.stderr
    assert p.stderr.splitlines() == [(f"pistill: error: pi@127.0.0.1:{port} accepted a TCP connection but did not "
                                         "answer as an SSH server (it closed the connection without an SSH banner); "
                                         "check the host and port")], p.stderr
    assert not (tmp_path / "s").exists()
