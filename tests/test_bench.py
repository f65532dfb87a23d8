"""The bench stage: config checks, and a run where one broken model does not stop the others."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest

from pistill.artifact import ArtifactWriter, config_dict
from pistill.device import agent
from pistill.device.bench import BenchConfig, run
from pistill.device.local import bench_model
from pistill.device.protocol import SUMMARY
from tiny import FakeConfig, model_artifact, named

QUICK = BenchConfig(threads=1, prompt_tokens=[8], gen_tokens=4, repeats=1, warmup=0, timeout_s=300, cooldown_s=0,
                    bandwidth_mb=4)


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory):
    def copy(d):
        shutil.copytree(tiny_model, d, dirs_exist_ok=True)
        return "."
    return model_artifact(tmp_path_factory.mktemp("bench"), "teacher", "hf", copy)


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    export = pytest.importorskip("pistill.export.gguf_convert", reason="the GGUF writer is not there")
    return model_artifact(tmp_path_factory.mktemp("bench"), "gguf", "gguf",
                          lambda d: export.write_gguf(tiny_model, d / "model-f32.gguf", "f32").name)


@pytest.fixture
def broken(tmp_path):
    def garbage(d):
        (d / "model.gguf").write_bytes(b"not a gguf file")
        return "model.gguf"
    return model_artifact(tmp_path, "quantize", "gguf", garbage)


@pytest.mark.parametrize("changes, message", [
    ({"target": "pi@@raspberrypi"}, "target 'pi@@raspberrypi' is not understood"),
    ({"target": "my pi"}, "target 'my pi' is not understood"),
    ({"targets": ["pi@a", "pi@b:0"]}, "target 'pi@b:0' is not understood"),
    ({"targets": ["pi@a", "pi@a"]}, "names a device twice"),
    ({"target": "pi@a", "targets": ["pi@b"]}, "target and targets are both set"),
    ({"targets": ["pi@b"], "inventory": "fleet.txt"}, "targets and inventory are both set"),
    ({"thread_sweep": [1, 0]}, "thread_sweep [1, 0] must be positive"),
    ({"cooldown_s": -1.0}, "cooldown_s = -1.0"),
    ({"bandwidth_mb": -1}, "bandwidth_mb = -1"),
    ({"hf_on_device": "onnx"}, "hf_on_device = 'onnx' is not one of gguf, torch, skip"),
    ({"remote_cache": " "}, "remote_cache is empty"),
    ({"threads": 0}, "threads = 0"),
    ({"prompt_tokens": []}, "prompt_tokens [] must be positive"),
    ({"prompt_tokens": [64, 0]}, "prompt_tokens [64, 0]"),
    ({"prompt_tokens": ["64"]}, "must be positive integers"),
    ({"gen_tokens": 0}, "gen_tokens = 0"),
    ({"repeats": 0}, "repeats = 0"),
    ({"warmup": -1}, "warmup = -1"),
    ({"timeout_s": 0}, "timeout_s = 0"),
    ({"speculative": True, "draft_k": 0}, "draft_k = 0 must be at least 1"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ValueError) as err:
        BenchConfig(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", [BenchConfig(), QUICK, BenchConfig(prompt_tokens=[32, 128], warmup=0),
                                 BenchConfig(targets=["pi@pi5.local", "pi4"], thread_sweep=[1, 4], hf_on_device="torch",
                                             python="/usr/bin/python3", llama_cpp_lib="/opt/llama"),
                                 BenchConfig(speculative=True, draft_k=2)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == BenchConfig.VERSION
    assert BenchConfig(**d) == cfg and dataclasses.asdict(cfg) == d


def test_fleet_from_target_targets_or_inventory(tmp_path):
    assert BenchConfig().fleet() == ["local"] and BenchConfig(target="pi5").fleet() == ["pi5"]
    assert BenchConfig(targets=["pi@a", "pi@b:2222"]).fleet() == ["pi@a", "pi@b:2222"]
    inv = tmp_path / "fleet.txt"
    inv.write_text("# the lab\npi@pi5.local   # on the shelf\n\npi@pi4.local\n")
    assert BenchConfig(inventory=str(inv)).fleet() == ["pi@pi5.local", "pi@pi4.local"]
    inv.write_text("pi@ok\nnot valid\n")
    with pytest.raises(ValueError, match="target 'not valid' is not understood"):
        BenchConfig(inventory=str(inv)).validate_paths()
    inv.write_text("pi@a\npi@b  # the shelf\npi@a\n")  # the same device twice, as `targets` refuses
    with pytest.raises(ValueError, match=r"names pi@a twice; list each device once$"):
        BenchConfig(inventory=str(inv)).validate_paths()
    with pytest.raises(ValueError, match="does not exist"):
        BenchConfig(inventory=str(tmp_path / "none.txt")).validate_paths()


@pytest.mark.parametrize("line, message", [
    ('target = ","', '[bench] target = "," names no device; write "local", "user@host" or a Host alias'),
    ('target = "  "', '[bench] target = "  " names no device'),
    ('targets = ["", " "]', '[bench] targets[0] = "" names no device'),
    ('targets = ["pi@a", ","]', '[bench] targets[1] = "," names no device'),
    ('targets = ["pi@a", "pi@b,pi@c"]', "[bench] targets[1]: target 'pi@b,pi@c' is not understood; use \"local\""),
    ('target = "pi@a\\n"', "[bench] target 'pi@a\\n' is not understood"),  # `$` would have let the newline in
])
def test_empty_target_is_refused_at_recipe_load(tmp_path, line, message):
    """An empty device (it used to benchmark nothing or fail late) is a recipe error naming the key."""
    from pistill import recipe

    path = tmp_path / "r.toml"
    path.write_text(f"[bench]\n{line}\n")
    with pytest.raises(recipe.RecipeError) as err:
        recipe.load(path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value) and err.value.exit_code == 2


def test_a_device_whose_ssh_config_entry_is_bad_fails_alone(tmp_path, monkeypatch):
    """`Port abc` for one device of a fleet: that device's one-line error, not an exception out of its thread (which
    would lose the other devices' results)."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from pistill.device import fleet, target

    config = tmp_path / "ssh_config"
    config.write_text("Host bad\n  Port abc\n")
    monkeypatch.setattr(target, "USER_SSH_CONFIG", config)
    device = fleet.bench_remote("bad", {}, QUICK, Progress(console=Console(file=io.StringIO())))
    assert device["error"] == (f"{config}: Port 'abc' for bad is not a port number; write one from 1 to 65535 "
                               "(ssh's is 22)")
    assert fleet.reach("bad", QUICK) == {"error": device["error"]}


def test_bench_model_times_out(teacher):
    out = bench_model(teacher, dataclasses.replace(QUICK, timeout_s=1))  # importing torch alone takes longer
    assert out == {"error": "timed out after 1 s (BenchConfig.timeout_s)", "runtime": "torch"}


def test_bench_model_without_model(tmp_path):
    with ArtifactWriter(tmp_path / "data", "data", FakeConfig(), []) as w:
        pass
    assert "holds no model" in bench_model(w.artifact, QUICK)["error"]


def test_run_records_broken_model_and_finishes_others(teacher, gguf, broken, tmp_path):
    art = run(named([teacher, broken, gguf]), QUICK, tmp_path / "bench")
    results = json.loads(art.file("bench.json").read_text())
    assert list(results) == ["teacher", "quantize", "gguf"]
    assert results["quantize"]["error"].startswith("agent: error: llama_cpp failed on ")
    for stage, runtime in (("teacher", "torch"), ("gguf", "llama_cpp")):
        assert results[stage]["runtime"]["name"] == runtime and results[stage]["schema_version"] == 3
        assert results[stage]["bandwidth"]["gbs"] > 0 and results[stage]["decode_bw_fraction"] > 0
        assert set(art.metrics[stage]) == set(SUMMARY) and all(v > 0 for v in art.metrics[stage].values())
    assert art.metrics["quantize"] == {"error": results["quantize"]["error"]}
    assert art.manifest["target"] == "local" and art.manifest["host"]["cores"] >= 1
    assert not art.file("devices.json").exists() and "devices" not in art.metrics  # local: as before


def _report(model, bench):
    from pistill.report_gather import report_data
    from pistill.report_html import render_html
    from pistill.report_md import render_markdown

    report = report_data(named([model, bench]))
    return report, render_markdown(report), render_html(report)


def test_busy_machine_is_flagged_in_the_bench_and_the_report(gguf, tmp_path):
    """A CPU burner runs through a local bench: the agent records it and the report warns."""
    burner = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)  # a core busy for the few seconds of the bench
    try:
        art = run(named([gguf]), QUICK, tmp_path / "bench")
    finally:
        burner.kill()
        burner.wait()
    load = json.loads(art.file("bench.json").read_text())["gguf"]["load"]
    assert load["during"]["other_cores"] >= 0.5 and load["cores"] >= 1
    assert any(p["pid"] == burner.pid and p["name"] == "yes" for p in load["before"]["busy_processes"]), load
    assert load["busy"].startswith("other work used ") and " cores while it ran (" in load["busy"]  # names the busiest
    report, md, html = _report(gguf, art)
    assert report["bench"]["busy"] == {"gguf": load["busy"]} and report["bench"]["load"]["gguf"] == load
    row = report["devices"][0]["rows"][0]
    assert row["busy"] == load["busy"] and row["load"] == load  # report.json keeps the figures
    assert md.count("was measured on a busy machine (other work used ") == 2  # bench host and device sections
    assert "was measured on a busy machine" in html


def test_quiet_machine_has_no_busy_warning(gguf, tmp_path):
    quiet = agent.load_sample(1.0)
    if quiet["other_cores"] is None or quiet["other_cores"] >= 0.2:
        pytest.skip(f"this machine is busy with other work ({quiet['other_cores']} cores); the quiet case needs "
                    "a quiet machine (CI)")
    art = run(named([gguf]), QUICK, tmp_path / "bench")
    load = json.loads(art.file("bench.json").read_text())["gguf"]["load"]
    assert load["busy"] is None and load["during"]["other_cores"] < agent.BUSY_MIN_CORES, load
    report, md, html = _report(gguf, art)
    assert report["bench"]["busy"] == {} and report["bench"]["load"]["gguf"] == load
    assert "busy machine" not in md and "busy machine" not in html


def test_run_benches_every_model_of_an_artifact(tiny_model, teacher, tmp_path):
    """An artifact holding two models (the baseline's teacher files): both timed, keyed baseline and
    baseline:Q8_0 in bench.json and the metrics; a one-model artifact keeps its stage as key."""
    from pistill.export.gguf_convert import write_gguf

    with ArtifactWriter(tmp_path / "baseline", "baseline", FakeConfig(), []) as w:
        for name in ("a.gguf", "b.gguf"):
            write_gguf(tiny_model, w.dir / name, "f16")
        w.model = {"format": "gguf", "file": "a.gguf"}
        w.models = [{"key": "baseline", "format": "gguf", "file": "a.gguf"},
                    {"key": "baseline:Q8_0", "format": "gguf", "file": "b.gguf"}]
    art = run(named([teacher, w.artifact]), QUICK, tmp_path / "bench")
    results = json.loads(art.file("bench.json").read_text())
    assert list(results) == ["teacher", "baseline", "baseline:Q8_0"]
    assert {r["model"]["path"].rsplit("/", 1)[-1] for k, r in results.items() if k != "teacher"} == {"a.gguf", "b.gguf"}
    assert all(results[k]["decode_tps"] > 0 and art.metrics[k]["decode_tps"] > 0 for k in results)
