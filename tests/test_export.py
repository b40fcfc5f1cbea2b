"""`llmtailor export`: a trial's model written as a folder transformers loads, measured again, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import optuna
import pytest
import torch

from llmtailor import cli, files, models, text
from llmtailor.errors import UserError
from llmtailor.evaluators import quality
from llmtailor.plan import CompressionPlan
from llmtailor.report import export
from llmtailor.search.study import STUDY_ATTR

FAST = ["--context", "256", "--prompt", "64", "--task-items", "8", "--eval-windows", "2", "--window-tokens", "64",
        "--no-progress"]


@pytest.fixture(scope="module")
def joint(tiny_model_dir, tmp_path_factory):
    """A joint-guided study on the tiny model (GPTQ bits by sensitivity, pruning, cuts, 8-step students, a task),
    with its own cache folder; (results folder, study, cache folder)."""
    folder = tmp_path_factory.mktemp("export")
    cache, before = folder / "cache", os.environ["LLMTAILOR_CACHE"]
    os.environ["LLMTAILOR_CACHE"] = str(cache)
    space = folder / "space.yaml"
    space.write_text("preset: joint\nprecision: guided\ndistill_steps: [0, 8]\n")
    try:
        code = cli.main([str(a) for a in ["fit", tiny_model_dir, "--memory", "2MB", "--trials", 9, "--results",
                                          folder, "--space", space, "--calibration-windows", 2, "--study", "jg",
                                          "--no-stop-early", *FAST]])
    finally:
        os.environ["LLMTAILOR_CACHE"] = before
    assert code == 0
    study = optuna.load_study(study_name="jg", storage=f"sqlite:///{folder / 'jg' / 'study.db'}")
    return folder, study, cache


def _measured(study, want):
    return [t for t in study.trials if t.user_attrs.get("status") == "evaluated" and want(json.loads(t.user_attrs["plan"]))]


def test_an_exported_student_loads_in_transformers_and_scores_what_the_search_measured(joint, tmp_path,
                                                                                        monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    folder, study, cache = joint
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    distilled = _measured(study, lambda p: p["student"].get("layers") and p["student"]["distillation"]["steps"]
                          and any(v["bits"] < 16 for v in p["precision"].values()))
    assert distilled, "the study measured no cut, distilled and quantized plan"
    trial = distilled[0]
    out = tmp_path / "exported"
    code = cli.main(["export", "jg", "--trial", str(trial.number), str(out), "--results", str(folder)])
    printed = capsys.readouterr().out
    assert code == 0 and f"Exported trial {trial.number} to {out}" in printed
    record = json.loads((out / "scores.json").read_text())
    search, again = record["search"], record["export"]
    # The same plan from the same caches (statistics, layers, importance, the kept student): the same model.
    assert again["kl"] == pytest.approx(trial.user_attrs["kl"], rel=1e-5) and search["kl"] == trial.user_attrs["kl"]
    assert again["perplexity"] == pytest.approx(trial.user_attrs["perplexity"], rel=1e-5)
    assert not again["trained_now"] and again["distill_steps"] == trial.user_attrs["distill_steps"]
    assert 0 <= again["accuracy"] <= 1 and again["accuracy_ci95"] > 0  # the study's task, measured again
    # What transformers loads from the folder is that model: smaller, and it scores the same.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    teacher = models.load(str(models.resolve(study.user_attrs[STUDY_ATTR]["model"])[1]))
    plan = json.loads((out / "plan.json").read_text())
    assert loaded.config.num_hidden_layers == len(plan["student"]["layers"]) < teacher.arch.num_layers
    reference = quality.Reference(teacher.model, teacher.tokenizer, text.split("pydoc").evaluation, 2, 64,
                                  quality.SEARCH_TOP_K)
    assert quality.measure(loaded, reference).kl == pytest.approx(trial.user_attrs["kl"], rel=1e-5)
    ids = torch.arange(1, 17)[None]
    assert loaded(ids).logits.shape[-1] == teacher.arch.vocab_size
    card = (out / "README.md").read_text()
    assert f"Trial {trial.number} of study `jg`" in card and "pydoc evaluation split, 2 x 64 tokens" in card
    assert f"{len(plan['student']['layers'])} blocks kept" in card and "distilled 8 steps" in card
    assert "pydoc calibration split, 2 x 512 tokens" in card  # the calibration text is named beside the evaluation's
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~files.umask()}  # not safetensors' 0600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_sequential_export_is_the_block_by_block_compression_of_the_plan(joint, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llmtailor.compression import calibration, sequential

    folder, study, cache = joint
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    # GPTQ layers in two blocks at least: with one, the block-by-block calibration sees the teacher's inputs as
    # the search's did, and the figures come out equal (a study on another CPU drew such a plan first)
    quantized = _measured(study, lambda p: CompressionPlan.from_dict(p).student.is_identity and len(
        {name.split(".")[2] for name, v in p["precision"].items()
         if v["method"] == "gptq" and v["bits"] < 16 and name.startswith("model.layers.")}) >= 2)
    assert quantized, "the study measured no GPTQ plan without a student over two blocks"
    trial = quantized[0]
    record = export.export(study, trial.number, tmp_path / "out", sequential=True, log=lambda line: None)
    assert record["compression"] == "sequential" and record["search"]["kl"] == trial.user_attrs["kl"]
    assert record["export"]["kl"] != pytest.approx(trial.user_attrs["kl"], rel=1e-3)  # another model: new figures
    info = study.user_attrs[STUDY_ATTR]
    teacher = models.load(info["model"])
    windows = calibration.CalibrationSpec(**info["calibration"]).make_windows(teacher.model, teacher.tokenizer)
    plan = CompressionPlan.from_json((tmp_path / "out" / "plan.json").read_text())
    forms = {}  # module -> its codes, scales and zero points, as a packed (GGUF) export reads them
    expected = sequential.compress_sequential(plan, teacher.model, teacher.arch, windows, quantized_forms=forms)
    quantized_layers = sum(p.bits < 16 for p in plan.precision.values())
    assert len(forms) == quantized_layers and all(torch.equal(q.dequantize(), module.weight.data)
                                                  for module, q in forms.items())
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits,
                                   expected(ids).logits, rtol=0, atol=1e-5)
    assert "block by block" in (tmp_path / "out" / "README.md").read_text()


def test_a_half_precision_export_stores_and_scores_the_rounded_weights(joint, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, study, cache = joint
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    trial = _measured(study, lambda p: CompressionPlan.from_dict(p).student.is_identity)[0]
    full = export.export(study, trial.number, tmp_path / "f32", log=lambda line: None)
    half = export.export(study, trial.number, tmp_path / "bf16", dtype="bfloat16", log=lambda line: None)
    assert half["dtype"] == "bfloat16" and half["export"]["file_bytes"] < 0.55 * full["export"]["file_bytes"]
    assert half["export"]["kl"] != full["export"]["kl"]  # the rounded weights: their own figures
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    teacher = models.load(str(models.resolve(study.user_attrs[STUDY_ATTR]["model"])[1]))
    reference = quality.Reference(teacher.model, teacher.tokenizer, text.split("pydoc").evaluation, 2, 64,
                                  quality.SEARCH_TOP_K)
    assert quality.measure(loaded.float(), reference).kl == pytest.approx(half["export"]["kl"], rel=1e-5)
    assert "stored as bfloat16" in (tmp_path / "bf16" / "README.md").read_text()
    with pytest.raises(UserError, match=r"--dtype sets the float weights of --format hf; --format gguf packs"):
        export.export(study, trial.number, tmp_path / "g", format="gguf", dtype="float16")
    with pytest.raises(UserError, match=r"unknown weight type 'int8': choose one of float32, float16, bfloat16"):
        export.export(study, trial.number, tmp_path / "i", dtype="int8")
    assert not (tmp_path / "g").exists() and not (tmp_path / "i").exists()


def test_export_refuses_what_it_cannot_write_or_find(joint, tmp_path, monkeypatch):
    folder, study, cache = joint
    monkeypatch.setenv("LLMTAILOR_CACHE", str(cache))
    measured = _measured(study, lambda p: True)[0].number
    with pytest.raises(UserError, match=r"study 'jg' has no such trial: export a measured trial, such as one on the "
                                        r"front \(\d"):
        export.export(study, 999, tmp_path / "a")
    student = _measured(study, lambda p: not CompressionPlan.from_dict(p).student.is_identity)[0].number
    with pytest.raises(UserError, match=rf"trial {student}'s plan cuts or distills a student, which sequential "):
        export.export(study, student, tmp_path / "a", sequential=True)
    # From the command line: one line on stderr (no library warning about opening the storage before it), exit 2.
    done = subprocess.run([sys.executable, "-m", "llmtailor.cli", "export", "jg", "--trial", "999", str(tmp_path / "a"),
                           "--results", str(folder)], capture_output=True, text=True, env={**os.environ,
                                                                                          "PYTHONWARNINGS": "default"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("llmtailor: error: study 'jg' has no such trial")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="taken already exists: export writes a new folder"):
        export.export(study, measured, tmp_path / "taken")
    # A study whose model is no longer the one at its path.
    other = tmp_path / "other"
    shutil.copytree(folder / "jg", other)
    moved = optuna.load_study(study_name="jg", storage=f"sqlite:///{other / 'study.db'}")
    info = dict(moved.user_attrs[STUDY_ATTR])
    info["arch"] = {**info["arch"], "num_layers": info["arch"]["num_layers"] + 1}
    moved.set_user_attr(STUDY_ATTR, info)
    with pytest.raises(UserError, match="is not the model study 'jg' was made for .*: its architecture differs"):
        export.export(moved, measured, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "taken"]  # nothing written by a refusal


def test_a_study_of_an_uncalibrated_space_exports_without_calibration(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    assert cli.main([str(a) for a in ["fit", tiny_model_dir, "--memory", "500kB", "--trials", 4, "--results", tmp_path,
                                      "--study", "c", "--tasks", "none", *FAST]]) == 0
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'c' / 'study.db'}")
    trial = _measured(study, lambda p: True)[-1]
    over = next(t.number for t in study.trials if t.user_attrs.get("status") == "over_budget")
    with pytest.raises(UserError, match=rf"did not measure trial {over} \(over_budget\)"):
        export.export(study, over, tmp_path / "out")
    record = export.export(study, trial.number, tmp_path / "out", log=lambda line: None)
    assert record["export"]["kl"] == pytest.approx(trial.user_attrs["kl"], rel=1e-5)
    assert "accuracy" not in record["export"] and record["calibration_text"] is None
    assert "none (no calibrated method)" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(UserError, match="has no calibration text .* --sequential would give the same model"):
        export.export(study, trial.number, tmp_path / "seq", sequential=True)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
