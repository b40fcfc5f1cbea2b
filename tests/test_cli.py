"""The command line end to end on the tiny model: fit, resume, report, devices, and every user error."""

import csv
import json
import re

import optuna
import pytest

from llmtailor import cli
from llmtailor.search import study as study_mod

FAST = ["--context", "256", "--prompt", "64", "--task-items", "8", "--eval-windows", "2", "--window-tokens", "64",
        "--no-progress"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_writes_front_report_and_plans_then_resumes(tiny_model_dir, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 5, "--study", "t", "--results", results, *FAST]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "Best plan that fits" in out
    best = re.search(r"Best plan that fits .*: trial (\d+)", out).group(1)
    assert f"llmtailor export t --trial {best} OUT --results {results}" in out
    folder = results / "t"
    rows = list(csv.DictReader((folder / "front.csv").open()))
    assert rows, "the front is empty"
    for row in rows:
        assert float(row["memory_mb"]) <= 0.5 and row["status"] == "evaluated"
        assert float(row["kl"]) >= 0 and float(row["perplexity"]) > 1 and 0 <= float(row["accuracy"]) <= 1
        plan = json.loads((folder / "plans" / f"{row['trial']}.json").read_text())
        assert set(plan) == {"precision", "sparsity", "student", "kv_cache_bits"}
    html = (folder / "report.html").read_text()
    assert "<svg" in html and "Accuracy vs memory" in html and "Pareto front" in html
    assert "how far its\nlatencies are from measurement: " in html
    assert "<code>llmtailor export\nt --trial N OUT</code>" in html
    trials = list(csv.DictReader((folder / "trials.csv").open()))
    assert sum(t["status"] == "evaluated" for t in trials) == 5
    # The first enqueued baseline is the dense model: over this budget, rejected by cost alone.
    assert trials[0]["status"] == "over_budget"
    # Enqueued uniform plans are marked as baselines, the sampler's as sampled, and the summary counts them.
    enqueued = len(study_mod.spaces.get("coarse").baselines(study_mod.models.load_architecture(str(tiny_model_dir))[0]))
    assert [t["origin"] for t in trials] == ["baseline"] * enqueued + ["sampled"] * (len(trials) - enqueued)
    found = sum(r["origin"] == "sampled" for r in rows)
    assert f"no uniform baseline dominates them): {found}; uniform baselines: {len(rows) - found}." in out

    code, _, err = run([*argv[:4], "--trials", 7, *argv[6:]], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'study.db'}")
    assert study_mod.measured(study) == 7
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    for trial in study.trials:  # memory after, the trial's own peak, the process's peak so far
        if trial.user_attrs["status"] == "evaluated":
            a = trial.user_attrs
            assert 0 < a["rss_bytes"] <= a["trial_peak_rss_bytes"] <= a["peak_rss_bytes"]
            assert 0 <= a["trim_seconds"] < a["seconds"]  # freed memory handed back after every trial, timed
    code, _, err = run([*argv[:4], "--trials", 7, *argv[6:]], capsys)
    assert code == 0 and "already has 7 measured" in err

    code, _, err = run(["fit", tiny_model_dir, "--memory", "400kB", "--trials", 8, "--study", "t",
                        "--results", results, *FAST], capsys)
    assert code == 2 and "was made with another device" in err

    (folder / "report.html").unlink()
    code, out, _ = run(["report", "t", "--results", results], capsys)
    assert code == 0 and (folder / "report.html").is_file()


def test_failed_trials_are_recorded_and_the_study_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    from llmtailor.evaluators import quality

    calls = {"n": 0}
    real = quality.measure

    def flaky(model, reference, windows=slice(None)):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FloatingPointError("the compressed model's outputs are not finite (NaN or inf)")
        return real(model, reference, windows)

    monkeypatch.setattr(quality, "measure", flaky)
    args = cli.build_parser().parse_args(["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "4",
                                          "--results", str(tmp_path), *FAST])
    setup = study_mod.prepare(cli._config(args))
    study = study_mod.run(setup, progress=False, log=lambda m: None)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "not finite" in failed[0].user_attrs["fail_reason"]
    assert study_mod.measured(study) == 4


def test_a_teacher_that_cannot_be_restored_stops_the_sweep_with_one_line(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from llmtailor.compression import originals

    def lost(self, parameters):
        raise originals.TeacherChanged("model.safetensors changed or was removed while a search read it")

    monkeypatch.setattr(originals.Originals, "restore", lost)
    code, _, err = run(["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "4", "--results", str(tmp_path),
                        "--study", "lost", *FAST], capsys)
    assert code == 2 and "changed or was removed" in err.strip().splitlines()[-1]
    trials = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'lost' / 'study.db'}").trials
    assert [t.state for t in trials if t.user_attrs.get("status") == "failed"] == [optuna.trial.TrialState.FAIL]


def test_a_full_disk_stops_the_sweep_with_one_line_and_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno

    real = study_mod.TrialEvaluator._measure

    def full(self, plan, trial, attrs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(study_mod.TrialEvaluator, "_measure", full)
    args = ["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "4", "--results", str(tmp_path),
            "--study", "full", *FAST]
    code, _, err = run(args, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "no space left on the disk" in last and "run the same command again" in last
    trials = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'full' / 'study.db'}").trials
    assert len([t for t in trials if t.state == optuna.trial.TrialState.FAIL]) == 1
    monkeypatch.setattr(study_mod.TrialEvaluator, "_measure", real)
    code, _, _ = run(args, capsys)
    trials = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'full' / 'study.db'}").trials
    assert code == 0 and sum(study_mod.status(t) == "evaluated" for t in trials) == 4


def test_fit_searches_without_calibration_and_a_sweep_every_axis_by_default():
    parser = cli.build_parser()
    assert parser.parse_args(["fit", "--memory", "1GB"]).space == "coarse"
    assert parser.parse_args(["sweep", "--memory", "1GB"]).space == "joint-guided"
    assert parser.parse_args(["sweep", "--memory", "1GB"]).sampler == "tpe"


def test_devices_lists_the_profiles(capsys):
    code, out, _ = run(["devices"], capsys)
    assert code == 0
    for name in ("raspberry-pi-5-8gb", "laptop-x86-16gb", "rtx-4090-24gb"):
        assert name in out


def test_the_cache_command_sums_each_kind_lists_entries_and_clears_only_the_kinds_named(tmp_path, capsys,
                                                                                        monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    for name, size in (("layers/ab/ab12.safetensors", 1000), ("layers/ab/ab34.safetensors", 2000),
                       ("layers/cd/cd56.safetensors", 500), ("students/s1/model.safetensors", 4000),
                       ("students/s1/training.json", 10), ("tasks/arc.json", 30)):
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(b"x" * size)
    code, out, _ = run(["cache"], capsys)
    assert code == 0
    assert re.search(r"^layers +3 entries +3.5 kB", out, re.M), out  # the files, not the two shard folders
    assert re.search(r"^students +1 entries +4.0 kB", out, re.M) and re.search(r"^tasks +1 entries", out, re.M), out
    assert "6 entries" not in out and out.strip().endswith(f"5 entries, 7.5 kB in {cache}")
    code, out, _ = run(["cache", "--entries"], capsys)
    assert str(cache / "layers" / "ab" / "ab12.safetensors") in out and str(cache / "students" / "s1") in out
    code, out, _ = run(["cache", "--clear", "layers", "tasks"], capsys)
    assert code == 0 and re.search(r"^removed layers +3 entries", out, re.M), out
    assert sorted(p.name for p in cache.iterdir()) == ["layers", "students", "tasks"]
    assert not any((cache / "layers").iterdir()) and not any((cache / "tasks").iterdir())  # shard folders too
    assert (cache / "students" / "s1" / "training.json").is_file(), "a kind not named was cleared"
    code, out, _ = run(["cache", "--clear"], capsys)
    assert code == 0 and "removed students" in out and not any((cache / "students").iterdir())
    code, out, _ = run(["cache"], capsys)
    assert "is empty" in out


def test_a_malformed_layer_cache_bound_is_one_line_before_anything_loads(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("LLMTAILOR_LAYER_CACHE_MAX", "0MB")
    code, _, err = run(["fit", tiny_model_dir, "--memory", "500kB", "--results", tmp_path, *FAST], capsys)
    assert code == 2 and err.strip() == "llmtailor: error: LLMTAILOR_LAYER_CACHE_MAX must be more than zero, got '0MB'"
    assert not any(tmp_path.iterdir())


def _only_known_kinds(cache):
    """Every folder a search writes into the cache is a kind `llmtailor cache` lists and clears."""
    from llmtailor.cache import KINDS

    assert {p.name for p in cache.iterdir()} <= set(KINDS), sorted(p.name for p in cache.iterdir())


def test_an_interrupted_trial_is_not_counted_and_is_redone(tiny_model_dir, tmp_path, monkeypatch):
    from llmtailor.evaluators import quality

    real = quality.measure
    interrupt = {"armed": True}

    def ctrl_c_once(model, reference, windows=slice(None)):
        if interrupt.pop("armed", False):
            raise KeyboardInterrupt
        return real(model, reference, windows)

    monkeypatch.setattr(quality, "measure", ctrl_c_once)
    args = cli.build_parser().parse_args(["fit", str(tiny_model_dir), "--memory", "500kB", "--trials", "3",
                                          "--results", str(tmp_path), *FAST])
    setup = study_mod.prepare(cli._config(args))
    with pytest.raises(KeyboardInterrupt):
        study_mod.run(setup, progress=False, log=lambda m: None)
    study = study_mod.run(setup, progress=False, log=lambda m: None)
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["status"] == "interrupted"
    assert "Ctrl-C" in interrupted[0].user_attrs["fail_reason"]
    assert study_mod.measured(study) == 3


def test_a_guided_search_calibrates_once_and_names_its_calibration(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 3, "--results", tmp_path, "--space", "guided",
            "--calibration-windows", 4, "--tasks", "none", *FAST]
    code, _, err = run([*argv, "--study", "first"], capsys)
    assert code == 0, err
    made = {p: p.stat().st_mtime_ns for folder in ("calibration", "sensitivity") for p in (cache / folder).iterdir()}
    assert len(made) == 2
    layers = sorted((cache / "layers").rglob("*.safetensors"))
    assert layers, "the sensitivities' GPTQ layers are in the per-layer cache"
    code, _, err = run([*argv, "--study", "second"], capsys)
    assert code == 0, err
    assert re.search(r"per-layer cache: (\d+) of \1 layers read from it \(100%\)", err), err
    # The second study reuses the statistics and sensitivities and adds no layer: every plan is assembled from them.
    assert {p: p.stat().st_mtime_ns for p in made} == made
    assert sorted((cache / "layers").rglob("*.safetensors")) == layers
    _only_known_kinds(cache)
    html = (tmp_path / "second" / "report.html").read_text()
    assert "GPTQ calibrated on pydoc calibration split, 4 x 512 tokens" in html
    study = optuna.load_study(study_name="second", storage=f"sqlite:///{tmp_path / 'second' / 'study.db'}")
    plans = [json.loads(t.user_attrs["plan"]) for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    assert plans and all(p["method"] == "gptq" for plan in plans for p in plan["precision"].values())


def test_a_prune_search_measures_importance_once_and_tries_cuts_and_calibrated_pruning(tiny_model_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    argv = ["fit", tiny_model_dir, "--memory", "2MB", "--trials", 7, "--results", tmp_path, "--space", "prune",
            "--calibration-windows", 4, "--tasks", "none", *FAST]
    code, _, err = run([*argv, "--study", "first"], capsys)
    assert code == 0, err
    (importance,) = (cache / "importance").iterdir()
    made = importance.stat().st_mtime_ns
    study = optuna.load_study(study_name="first", storage=f"sqlite:///{tmp_path / 'first' / 'study.db'}")
    plans = [json.loads(t.user_attrs["plan"]) for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    assert len(plans) == 7  # the seven baselines
    assert [len(plan["student"]["layers"]) for plan in plans if plan.get("student", {}).get("layers")] == [3]
    assert {s["method"] for plan in plans for s in plan.get("sparsity", {}).values()} == {"sparsegpt"}
    code, _, err = run([*argv, "--study", "second", "--trials", 2], capsys)
    assert code == 0, err
    assert importance.stat().st_mtime_ns == made  # read, not measured again


def test_a_study_made_before_calibrating_says_why_it_no_longer_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    from llmtailor.hw_profiles import host

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 1, "--results", tmp_path, "--tasks", "none",
            "--study", "before", *FAST]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    monkeypatch.setattr(host, "measure", lambda: {
        "read_bandwidth_gbps": 10.0, "probe_bytes": 1 << 20, "fp32_tflops": 0.05, "bf16_tflops": 0.1,
        "decode_read_gbps": 5.0, "fp32_decode_read_gbps": 4.0, "bf16_decode_read_gbps": 6.0,
        "fp32_prefill_tflops": 0.04, "bf16_prefill_tflops": 0.08, "int8_dynamic_tflops": 0.0,
        "block_overhead_us": 50.0, "memory_bytes": 8 << 30, "available_bytes": 4 << 30, "runtime_bytes": 300 << 20,
        "threads": torch.get_num_threads(), "cpu": "test"})
    assert run(["devices", "--calibrate"], capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 2 and "made with another device (the same device with other figures" in err, err


def test_a_study_stored_before_later_fields_existed_still_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 1, "--results", results, "--tasks", "none",
            "--study", "old", *FAST]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    storage = f"sqlite:///{results / 'old' / 'study.db'}"
    study = optuna.load_study(study_name="old", storage=storage)
    stored = study.user_attrs[study_mod.STUDY_ATTR]
    del stored["workload"]["dense_dtype"], stored["device"]["bandwidth_efficiency_by_precision"]
    study.set_user_attr(study_mod.STUDY_ATTR, stored)  # as a version before these fields wrote it
    code, _, err = run([*argv[:4], "--trials", 2, *argv[6:]], capsys)
    assert code == 0, err
    stored["workload"]["context_length"] = 4096  # a real difference is still refused
    study.set_user_attr(study_mod.STUDY_ATTR, stored)
    code, _, err = run([*argv[:4], "--trials", 3, *argv[6:]], capsys)
    assert code == 2 and "made with another workload" in err


def test_a_distill_search_trains_each_student_once_ranks_short_runs_first_and_records_the_training(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    import dataclasses

    from llmtailor import spaces
    from llmtailor.spaces.joint import PRESETS, JointSpace

    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    monkeypatch.setitem(spaces.SPACES, "distill",
                        JointSpace("distill", dataclasses.replace(PRESETS["distill"], distill_steps=(0, 4, 8))))
    argv = ["fit", tiny_model_dir, "--memory", "2MB", "--trials", 9, "--results", tmp_path, "--space", "distill",
            "--calibration-windows", 2, "--tasks", "none", "--objectives", "kl,memory,train_seconds", *FAST]
    code, _, err = run([*argv, "--study", "first"], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="first", storage=f"sqlite:///{tmp_path / 'first' / 'study.db'}")
    done = [t for t in study.trials if t.user_attrs.get("status") in ("evaluated", "duplicate")]
    distilled = [t for t in done if t.user_attrs["distill_steps"]]
    assert distilled, "the baselines hold a distilled depth cut"
    for t in distilled:
        plan = json.loads(t.user_attrs["plan"])
        assert plan["student"]["distillation"]["steps"] == t.user_attrs["distill_steps"]
        assert t.user_attrs["fidelity"] in ("short", "full") and t.user_attrs["train_seconds"] > 0
        assert (t.user_attrs["fidelity"] == "short") == (t.user_attrs["distill_steps"] < t.params["distill_steps"])
        assert t.values[2] == t.user_attrs["train_seconds"]
    for t in distilled:
        if t.user_attrs["fidelity"] == "short" and "stopped_by" in t.user_attrs:  # by a trial far ahead, no dearer
            ahead = study.trials[t.user_attrs["stopped_by"]]
            assert ahead.values[0] * 2 <= t.values[0] and ahead.values[1] <= t.values[1]
    assert all(t.user_attrs["train_seconds"] == 0 for t in done if not t.user_attrs["distill_steps"])
    # With no margin that stops a student, every distilled trial gets its full budget, trained once ...
    monkeypatch.setattr(study_mod, "FIDELITY_MARGIN", 1e9)
    code, _, err = run([*argv, "--study", "second", "--trials", 6], capsys)
    assert code == 0, err
    second = optuna.load_study(study_name="second", storage=f"sqlite:///{tmp_path / 'second' / 'study.db'}")
    full = [t for t in second.trials if t.user_attrs.get("fidelity") == "full"]
    assert full and all(t.user_attrs["distill_steps"] == t.params["distill_steps"] for t in full)
    assert any(t.user_attrs["train_seconds_spent"] > 0 for t in full)
    kept = sorted(p.name for p in (cache / "students").iterdir())
    # ... and a third study over the same cache (the same process and seed: the same draws) trains nothing.
    code, _, err = run([*argv, "--study", "third", "--trials", 6], capsys)
    assert code == 0, err
    third = optuna.load_study(study_name="third", storage=f"sqlite:///{tmp_path / 'third' / 'study.db'}")
    assert sorted(p.name for p in (cache / "students").iterdir()) == kept
    assert all(t.user_attrs["train_seconds_spent"] == 0 for t in third.trials if t.user_attrs.get("fidelity"))
    _only_known_kinds(cache)


def test_a_space_that_trains_every_weight_of_its_students_runs_in_a_sweep(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from llmtailor.spaces.joint import DISTILL_FULL_LEARNING_RATE

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "full.yaml"
    space.write_text("preset: distill\ncut_blocks: [0.0, 0.2]\ncut_heads: [0.0]\ncut_mlp: [0.0]\n"
                     "distill_steps: [0, 4]\ndistill_lora_ranks: [0]\n")
    code, _, err = run(["fit", tiny_model_dir, "--memory", "2MB", "--trials", 5, "--results", tmp_path, "--space",
                        space, "--calibration-windows", 2, "--tasks", "none", "--study", "full", *FAST], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{tmp_path / 'full' / 'study.db'}")
    (distilled,) = [t for t in study.trials if t.user_attrs.get("distill_steps")]  # the distilled depth-cut baseline
    recipe = json.loads(distilled.user_attrs["plan"])["student"]["distillation"]
    assert recipe.get("lora_rank", 0) == 0 and recipe["learning_rate"] == DISTILL_FULL_LEARNING_RATE
    assert distilled.user_attrs["train_seconds"] > 0 and distilled.user_attrs["kl"] > 0
    (undistilled,) = [t for t in study.trials if t.params.get("cut_blocks") and not t.user_attrs.get("distill_steps")]
    assert distilled.user_attrs["kl"] != undistilled.user_attrs["kl"], "training changed nothing"
    assert any((tmp_path / "cache" / "students").iterdir()), "the student is kept"


def test_quality_is_measured_and_reported_on_each_evaluation_text(tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other.txt"
    words = "river stone lantern orchard violin harbour meadow copper thistle beacon".split()
    other.write_text("\n\n".join(" ".join(words[(i + j) % 10] for j in range(60)) + "." for i in range(40)))
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 3, "--results", tmp_path, "--tasks", "none",
            "--eval-text", "pydoc", other, *FAST]
    code, _, err = run([*argv, "--study", "mean"], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="mean", storage=f"sqlite:///{tmp_path / 'mean' / 'study.db'}")
    measured = [t for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    assert measured
    for t in measured:
        by_text = t.user_attrs["kl_by_text"]
        assert set(by_text) == {"pydoc", str(other)} and set(t.user_attrs["perplexity_by_text"]) == set(by_text)
        assert t.user_attrs["kl"] == pytest.approx(sum(by_text.values()) / 2)
    html = (tmp_path / "mean" / "report.html").read_text()
    assert "kl_by_text" in html and f"each of pydoc, {other} (objectives on their mean" in html
    code, _, err = run([*argv, "--study", "named", "--quality-text", other], capsys)
    assert code == 0, err
    named = optuna.load_study(study_name="named", storage=f"sqlite:///{tmp_path / 'named' / 'study.db'}")
    for t in named.trials:
        if t.user_attrs.get("status") == "evaluated":
            assert t.user_attrs["kl"] == t.user_attrs["kl_by_text"][str(other)] and t.values[0] == t.user_attrs["kl"]
    # The same study with other evaluation texts does not resume: its scores would not compare.
    code, _, err = run([*argv[:-len(FAST) - 3], "--eval-text", "pydoc", *FAST, "--study", "named"], capsys)
    assert code == 2 and "eval texts" in err


def test_cheap_before_dear_stops_far_behind_plans_at_a_slice_and_gives_accuracy_only_to_the_front(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study_mod, "SLICE_MARGIN", 0.0)  # on the tiny model few plans are far behind: stop any behind
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 8, "--results", tmp_path, "--study", "stages",
            *FAST[:-5], "--eval-windows", 4, "--window-tokens", 64, "--no-progress"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="stages", storage=f"sqlite:///{tmp_path / 'stages' / 'study.db'}")
    measured = [t for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    stages = {t.user_attrs["stage"] for t in measured}
    assert "kl_slice" in stages and "accuracy" in stages, stages
    for t in measured:
        a = t.user_attrs
        assert ("accuracy" in a) == (a["stage"] == "accuracy") and set(a["stage_seconds"]) >= {"apply", "kl_slice"}
        assert a["eval_tokens"] == (64 if a["stage"] == "kl_slice" else 256)
        if a["stage"] == "kl_slice":
            assert "stopped_over_floor" not in a  # (the default floor is far above the tiny model's KL)
            ahead = study.trials[a["stopped_by"]]
            assert ahead.values[0] <= t.values[0] and all(x <= y for x, y in zip(ahead.values[1:], t.values[1:], strict=True))
        if a["stage"] == "accuracy":
            assert 0 < a["accuracy_ci95"] < 0.5
            # Paired with the teacher's answers to the same items, measured once and kept in the cache folder.
            assert -1 <= a["accuracy_vs_teacher"] <= 1 and 0 <= a["accuracy_vs_teacher_ci95"] < 1
    from llmtailor import models

    teacher_scores = list((models.cache_dir() / "tasks").glob("teacher-*.json"))
    assert teacher_scores and all(json.loads(path.read_text())["pydoc_cloze"] for path in teacher_scores)
    front = csv.DictReader((tmp_path / "stages" / "front.csv").open())
    assert all(row["accuracy"] for row in front)  # every plan on the front was measured in full, with accuracy
    assert "stopped after KL on a slice" in (tmp_path / "stages" / "report.html").read_text()


def test_a_quality_floor_keeps_plans_beyond_it_off_the_front_and_says_so(tiny_model_dir, tmp_path, capsys):
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 4, "--results", tmp_path, "--tasks", "none", *FAST]
    load = lambda name: optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")  # noqa: E731
    code, _, err = run([*argv, "--study", "open", "--max-kl", "none"], capsys)
    assert code == 0, err
    done = [t for t in load("open").trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(list(t.constraints) == ["memory_over_budget_bytes"] for t in done)
    floor = min(t.user_attrs["kl"] for t in done if t.user_attrs["status"] == "evaluated") / 10
    # A floor below every plan's KL: each is measured, kept and infeasible, and the answer says why there is none.
    code, out, err = run([*argv, "--study", "floored", "--max-kl", floor], capsys)
    assert code == 1, err
    assert f"None of the 4 measured plans that fit 500.0 kB is within the quality floor (KL to the teacher at most " \
           f"{floor:g} nats/token): the closest, trial " in out and "a larger --max-kl" in out
    study = load("floored")
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        a = t.user_attrs
        assert sorted(t.constraints) == [study_mod.KL_CONSTRAINT, "memory_over_budget_bytes"]  # on every trial
        if a["status"] == "over_budget":
            assert t.constraints[study_mod.KL_CONSTRAINT] == 0.0  # not measured: not known to exceed it
        else:
            assert t.constraints[study_mod.KL_CONSTRAINT] == pytest.approx(a["kl"] - floor)
            assert t.constraints[study_mod.KL_CONSTRAINT] > 0
            # Beyond the floor on the first slice by the margin: not measured further.
            assert a["stage"] == "kl_slice"
            assert a["status"] == "duplicate" or "stopped_by" in a or a["stopped_over_floor"] == floor
    assert any("stopped_over_floor" in t.user_attrs for t in study.trials)
    assert study.user_attrs["hypervolume_reference"]["kl"] == floor
    assert "4 measured plans beyond the quality floor (KL to the teacher above" in (tmp_path / "floored" / "report.html").read_text()
    code, _, err = run([*argv, "--study", "floored", "--trials", 5], capsys)  # (the default floor, 1.0)
    assert code == 2 and "made with another quality floor (--max-kl)" in err
    # A study made before the floor existed (no max_kl in its fingerprint) resumes without one.
    older = load("open")
    made_for = older.user_attrs[study_mod.STUDY_ATTR]
    del made_for["max_kl"]
    older.set_user_attr(study_mod.STUDY_ATTR, made_for)
    code, _, err = run([*argv, "--study", "open", "--trials", 6], capsys)
    assert code == 0, err
    assert study_mod.measured(load("open")) == 6
    assert all(list(t.constraints) == ["memory_over_budget_bytes"] for t in load("open").trials
               if t.state == optuna.trial.TrialState.COMPLETE)


def test_the_gp_sampler_runs_a_study_whose_trials_carry_the_floor_besides_the_budget(tiny_model_dir, tmp_path,
                                                                                     capsys):
    """GPSampler models each constraint and needs the same ones on every trial: plans over budget (not measured)
    carry the floor's too. Beyond its 10 start-up trials it reads them, and a differing count would raise."""
    argv = ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 13, "--results", tmp_path, "--tasks", "none",
            "--sampler", "gp", "--study", "gp", *FAST]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="gp", storage=f"sqlite:///{tmp_path / 'gp' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) > 11 and any(t.user_attrs["status"] == "over_budget" for t in done)
    assert all(len(t.constraints) == 2 for t in done)


def test_a_joint_guided_search_allocates_bits_and_cuts_prunes_and_distills(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"  # joint-guided with short distillation budgets
    space.write_text("preset: joint\nprecision: guided\ndistill_steps: [0, 8]\n")
    argv = ["fit", tiny_model_dir, "--memory", "2MB", "--trials", 9, "--results", tmp_path, "--space", space,
            "--calibration-windows", 2, "--tasks", "none", "--study", "jg", *FAST]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="jg", storage=f"sqlite:///{tmp_path / 'jg' / 'study.db'}")
    plans = [json.loads(t.user_attrs["plan"]) for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    assert all("weight_budget" in t.params for t in study.trials)
    assert any(p.get("sparsity") for p in plans) and any(p.get("student", {}).get("layers") for p in plans)
    assert any(p.get("student", {}).get("distillation", {}).get("steps") for p in plans)
    assert study.user_attrs["llmtailor"]["space_choices"]["precision"] == "guided"


def test_a_joint_space_file_resumes_from_another_path_and_is_refused_when_its_choices_changed(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    first, moved = tmp_path / "a" / "space.yaml", tmp_path / "b" / "mine.yaml"
    for file in (first, moved):
        file.parent.mkdir()
        file.write_text("preset: quant\nbits: [8]\n")
    argv = ["fit", tiny_model_dir, "--memory", "2MB", "--results", tmp_path, "--calibration-windows", 2,
            "--tasks", "none", "--study", "moved", *FAST]
    code, _, err = run([*argv, "--trials", 1, "--space", first], capsys)
    assert code == 0, err
    # The same choices in a file at another path (a moved file, another checkout): the study continues.
    code, _, err = run([*argv, "--trials", 2, "--space", moved], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="moved", storage=f"sqlite:///{tmp_path / 'moved' / 'study.db'}")
    assert study_mod.measured(study) == 2
    moved.write_text("preset: quant\nbits: [4, 8]\n")  # the file now offers other choices: refused
    code, _, err = run([*argv, "--trials", 3, "--space", moved], capsys)
    assert code == 2 and "made with another space choices" in err, err
    code, _, err = run([*argv, "--trials", 3, "--space", "direct"], capsys)  # not a joint space at all
    assert code == 2 and "made with another space, space choices" in err, err
