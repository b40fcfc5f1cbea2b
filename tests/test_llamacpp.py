"""llama.cpp as a second runtime: GGUF files read as plans, written cut or random, and a profile fitted to speeds.

Nothing here needs llama-cpp-python except the last test (skipped without it): the files are
written with the gguf package, and the fit is checked on speeds made by a known profile.
"""

import numpy as np
import pytest

from llmtailor import hw_profiles, models
from llmtailor.errors import UserError
from llmtailor.evaluators import cost
from llmtailor.hw_profiles import llamacpp

TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2)


def _arch(hidden: int, blocks: int):
    from transformers import LlamaConfig

    from llmtailor import arch

    return arch.from_config(LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                                        num_key_value_heads=2, tie_word_embeddings=True))


def test_a_depth_cut_copies_the_kept_blocks_bytes_and_reads_back_as_the_files_plan(tmp_path):
    cut = llamacpp.write(models.default_model_path(), tmp_path / "cut.gguf", blocks=2)
    arch = llamacpp.architecture(cut)
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size) == (2, 576, 1536)
    plan, dense = llamacpp.plan_of(cut, arch)
    assert dense == "float16" and plan.precision_of(arch.embedding.name) == llamacpp.PRECISIONS["Q8_0"]
    assert {plan.precision_of(lin.name) for lin in arch.linears} == {llamacpp.PRECISIONS["Q4_1"]}
    from gguf import GGUFReader

    original = {t.name: t for t in GGUFReader(models.default_model_path()).tensors}
    for tensor in GGUFReader(cut).tensors:  # the same bytes, not requantized
        assert np.array_equal(tensor.data, original[tensor.name].data)


def test_a_random_model_has_the_asked_shapes_and_the_sources_tokenizer(tmp_path):
    path = llamacpp.write(models.default_model_path(), tmp_path / "random.gguf", shapes={**TINY, "blocks": 3})
    arch = llamacpp.architecture(path)
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads) == \
        (3, 64, 128, 4, 2)
    assert arch.vocab_size == 49152
    plan, dense = llamacpp.plan_of(path, arch)
    assert dense == "float32" and not plan.precision


def test_formats_the_cost_model_cannot_price_are_one_line_errors(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "k.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 210), np.uint8), raw_dtype=GGMLQuantizationType.Q6_K)
    writer.add_tensor("blk.0.attn_k.weight", np.zeros((64, 64), np.float16))
    writer.add_tensor("blk.0.attn_v.weight", np.zeros((64, 64), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    arch = _arch(64, 1)
    with pytest.raises(UserError, match="blk.0.attn_q.weight is Q6_K; the cost model prices F16, Q8_0, Q4_0, Q4_1"):
        llamacpp.plan_of(path, arch)
    with pytest.raises(UserError, match="format 'Q5_K': use one of F16, Q8_0, Q4_0, Q4_1"):
        llamacpp.quantize(path, tmp_path / "out.gguf", "Q5_K")
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(UserError, match="need the optional llama-cpp-python package"):
        llamacpp.quantize(path, tmp_path / "out.gguf", "Q8_0")


def test_the_fit_recovers_the_profile_that_made_the_speeds(tmp_path):
    """Speeds predicted by a known llama.cpp profile on two widths, two depths and four formats give that profile back (rates where
    decode is bound by reading and prefill by arithmetic, as llama.cpp's are on a CPU)."""
    true = llamacpp.replace(llamacpp.base_profile(hw_profiles.load("laptop-x86-16gb")),
                            bandwidth_efficiency_by_precision={"fp16": 0.55}, bandwidth_efficiency=0.55,
                            weight_only_bandwidth_efficiency={"int8": 0.8, "int4": 0.65, "int4_zero_point": 0.5},
                            peak_tflops={"fp16": 0.3, "fp32": 1.0},
                            weight_only_tflops={"int8": 0.6, "int4": 0.5, "int4_zero_point": 0.35},
                            layer_overhead_us=40.0, prefill_ns_per_value={"fp16": 3.0})
    runs = []
    for hidden, blocks in [(h, b) for h in (256, 768) for b in (4, 12)]:
        arch = _arch(hidden, blocks)
        for precision, dense in ((None, "float16"), *((p, "float16") for p in llamacpp.PRECISIONS.values())):
            plan = cost.CompressionPlan(precision={lin.name: precision for lin in [*arch.linears, arch.embedding]}
                                        if precision else {})
            speed = llamacpp.Speed(0, 0, 256, 64, 2)
            latency = cost.latency(plan, arch, true, llamacpp.workload(speed, dense))
            runs.append((arch, plan, dense, llamacpp.Speed(latency.prefill_s, latency.decode_s_per_token, 256, 64, 2)))
    fitted = llamacpp.fit_profile(hw_profiles.load("laptop-x86-16gb"), runs)
    assert fitted.layer_overhead_us == pytest.approx(40.0, rel=0.05)
    assert fitted.prefill_ns_per_value["fp16"] == pytest.approx(3.0, rel=0.05)
    assert fitted.bandwidth_efficiency_by_precision["fp16"] == pytest.approx(0.55, rel=0.05)
    for width, share in (("int8", 0.8), ("int4", 0.65), ("int4_zero_point", 0.5)):
        assert fitted.weight_only_bandwidth_efficiency[width] == pytest.approx(share, rel=0.05)
    assert fitted.peak_tflops["fp16"] == pytest.approx(0.3, rel=0.05)
    for width, rate in (("int8", 0.6), ("int4", 0.5), ("int4_zero_point", 0.35)):
        assert fitted.weight_only_tflops[width] == pytest.approx(rate, rel=0.05)
    # what `devices --calibrate --runtime llama.cpp` writes loads back as the same profile
    assert hw_profiles.load(str(llamacpp.write_profile(fitted, tmp_path / "fitted.yaml"))) == fitted


def test_llama_cpp_quantizes_and_runs_a_random_model(tmp_path):
    pytest.importorskip("llama_cpp")
    f32 = llamacpp.write(models.default_model_path(), tmp_path / "r.gguf", shapes={**TINY, "blocks": 2})
    q8 = llamacpp.quantize(f32, tmp_path / "q8.gguf", "Q8_0")
    arch = llamacpp.architecture(q8)
    plan, _ = llamacpp.plan_of(q8, arch)
    assert {plan.precision_of(lin.name) for lin in [*arch.linears, arch.embedding]} == {llamacpp.PRECISIONS["Q8_0"]}
    speed = llamacpp.measure(q8, prompt=16, decode=4, repeats=1)
    assert speed.prefill_s > 0 and speed.decode_s_per_token > 0


def test_the_llama_cpp_profile_is_found_by_name_once_calibrated_and_its_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from llmtailor import cli
    from llmtailor.hw_profiles import host

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="no llama.cpp profile yet: measure it with `llmtailor devices --calibrate "
                                        "--runtime llama.cpp`"):
        hw_profiles.load(hw_profiles.HOST_LLAMA_CPP)
    assert cli.main(["devices", "--runtime", "llama.cpp"]) == 2
    assert "--runtime names the runtime --calibrate measures: add --calibrate" in capsys.readouterr().err
    assert cli.main(["devices", "--calibrate", "--runtime", "llama.cpp"]) == 2  # the shares are of the host's probe
    assert "no host profile yet" in capsys.readouterr().err
    host.profile_path().parent.mkdir(parents=True)
    host.profile_path().write_text(hw_profiles.load("laptop-x86-16gb").to_yaml())
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert cli.main(["devices", "--calibrate", "--runtime", "llama.cpp"]) == 2
    assert "need the optional llama-cpp-python package" in capsys.readouterr().err
    fitted = llamacpp.replace(llamacpp.base_profile(hw_profiles.load("laptop-x86-16gb")), layer_overhead_us=12.5)
    llamacpp.write_profile(fitted, host.llama_cpp_profile_path())
    assert hw_profiles.load(hw_profiles.HOST_LLAMA_CPP) == fitted
    assert cli.main(["devices"]) == 0 and "host-llama.cpp" in capsys.readouterr().out


def test_timings_that_do_not_fit_a_roofline_are_refused(tmp_path):
    arch = _arch(64, 2)
    plan = cost.CompressionPlan()
    runs = [(arch, plan, "float16", llamacpp.Speed(0.1, 0.01, 256, 64, 2)),
            (arch, plan, "float16", llamacpp.Speed(0.1, -0.01, 256, 64, 2))]
    with pytest.raises(UserError, match="do not fit the cost model .*non-positive.*idle machine"):
        llamacpp.fit_profile(hw_profiles.load("laptop-x86-16gb"), runs)


def test_a_gguf_model_is_converted_in_a_child_process_and_its_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path / "cache"))
    path = llamacpp.write(models.default_model_path(), tmp_path / "random.gguf", shapes={**TINY, "blocks": 2})
    messages = []
    loaded = models.load(str(path), log=messages.append)
    assert loaded.arch.num_layers == 2 and loaded.arch.hidden_size == 64
    assert len(messages) == 1 and "converting random.gguf once" in messages[0]
    assert models.load(str(path), log=messages.append).arch == loaded.arch and len(messages) == 1  # converted once
    # A failure inside the conversion (here: the architecture check skipped, so transformers' converter refuses)
    # comes back from the child as one line, and leaves nothing half written.
    from gguf import GGUFWriter

    foreign = tmp_path / "foreign.gguf"
    writer = GGUFWriter(str(foreign), "nosucharch")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="holds a 'nosucharch' model"):
        models.load_config(str(foreign))
    monkeypatch.setattr(models, "_check_convertible", lambda path, reader: None)
    with pytest.raises(UserError, match=r"could not load model '.*foreign.gguf': .*nosucharch") as caught:
        models.load_config(str(foreign))
    assert "\n" not in str(caught.value)
    kept = models._converted_gguf_dir(path).name
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == [".digests", kept]
