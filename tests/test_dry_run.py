"""The dry run: `llmtailor estimate` answers from a config alone, and agrees with the cost model."""

from __future__ import annotations

import json

import pytest

from llmtailor import cli, hw_profiles
from llmtailor.evaluators import cost


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def config_only(tmp_path_factory, tiny_model_dir):
    """The tiny model's folder with its config and nothing else: no weights, no tokenizer."""
    folder = tmp_path_factory.mktemp("config-only")
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    return folder


@pytest.fixture(scope="module")
def config_70b(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-70b")
    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def test_estimate_reads_a_config_folder_with_no_weights_and_matches_the_cost_model(config_only, tiny, capsys):
    from llmtailor import dry_run

    code, out, err = run(["estimate", config_only, "--memory", "8GB", "--bits", "4", "--group", "32", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    plan = dry_run.uniform_plan(tiny.arch, 4, 32)
    expected = cost.estimate(plan, tiny.arch, hw_profiles.from_memory("8GB"), cost.Workload())
    memory = result["memory_bytes"]
    assert memory["total"] == expected.memory.total == sum(v for k, v in memory.items() if k != "total")
    assert memory["weights"] + memory["scales"] + memory["zero_points"] + memory["embedding"] == cost.weight_bytes(
        plan, tiny.arch)
    assert result["decode_ms_per_token"] == pytest.approx(expected.latency.decode_s_per_token * 1e3)
    assert result["fits"] and result["parameters"] == tiny.arch.total_params
    code, out, _ = run(["estimate", config_only, "--memory", "8GB", "--bits", "4", "--group", "32"], capsys)
    assert code == 0 and "of 8.00 GB usable: fits" in out and "zero points" in out


def test_estimate_of_a_plan_file_and_of_n_m_without_a_ratio(config_only, tiny, tmp_path, capsys):
    from llmtailor import dry_run

    plan = dry_run.uniform_plan(tiny.arch, 8, 0, pattern="2:4")
    assert {s.ratio for s in plan.sparsity.values()} == {0.5}
    (tmp_path / "plan.json").write_text(plan.to_json())
    code, out, err = run(["estimate", config_only, "--memory", "8GB", "--plan", tmp_path / "plan.json", "--json"],
                         capsys)
    assert code == 0, err
    assert json.loads(out)["memory_bytes"]["sparse_index"] > 0


def test_a_70b_config_is_estimated_and_does_not_fit_a_raspberry_pi(config_70b, capsys):
    code, out, err = run(["estimate", config_70b, "--device", "raspberry-pi-5-8gb", "--bits", "4", "--json"], capsys)
    assert code == 1, err  # answered, and the answer is no
    result = json.loads(out)
    assert 69e9 < result["parameters"] < 72e9 and not result["fits"]
    assert 35e9 < result["memory_bytes"]["weights"] + result["memory_bytes"]["scales"] < 40e9


def test_estimate_reads_a_gguf_header_without_converting_it(capsys, monkeypatch):
    from llmtailor import models

    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("the dry run converted the GGUF"))
    code, out, err = run(["estimate", "--memory", "8GB", "--bits", "8", "--group", "0"], capsys)
    assert code == 0, err
    assert out.startswith("SmolLM2-135M-Instruct on memory-8GB: 134.5M parameters")
