import dataclasses
import math
from pathlib import Path

import pytest

from llmtailor import hw_profiles
from llmtailor.errors import UserError
from llmtailor.evaluators import cost
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity


def test_tensor_bytes_by_hand():
    # 4 rows x 10 inputs, 4-bit, groups of 4: 3 groups per row (the last holds 2 inputs).
    b = cost.tensor_bytes(4, 10, LayerPrecision(4, 4), LayerSparsity())
    assert (b.values, b.scales, b.zeros, b.index) == (20, 4 * 3 * 2, 6, 0)
    assert cost.tensor_bytes(4, 10, LayerPrecision(4, 4, symmetric=True), LayerSparsity()).total == 20 + 24
    assert cost.tensor_bytes(4, 10, LayerPrecision(), LayerSparsity()).total == 80  # float16
    # 3 bits per row-group: 40 codes -> 15 bytes, 4 scales, 4 zero points -> 2 bytes.
    assert cost.tensor_bytes(4, 10, LayerPrecision(3, 0), LayerSparsity()).total == 15 + 8 + 2


def test_sparse_storage_picks_the_smallest_form():
    half = cost.tensor_bytes(100, 200, LayerPrecision(), LayerSparsity(0.5))
    assert half.format == "bitmask" and half.total == 100 * 100 * 2 + 100 * 200 // 8
    sparse = cost.tensor_bytes(100, 200, LayerPrecision(), LayerSparsity(0.95))
    assert sparse.format == "csr" and sparse.total == 100 * 10 * (2 + 2) + 101 * 4
    light = cost.tensor_bytes(100, 200, LayerPrecision(4), LayerSparsity(0.1))
    assert light.format == "dense"  # a mask costs more than 10% of 4-bit codes saves
    nm = cost.tensor_bytes(8, 16, LayerPrecision(8), LayerSparsity(0.5, "2:4"))
    assert nm.format == "n:m" and nm.values == 64 and nm.index == 64 * 2 // 8


def test_kv_cache_bytes_by_hand(tiny):
    arch = tiny.arch  # 4 blocks, 2 KV heads of 16
    w = cost.Workload(context_length=100, batch_size=3)
    assert cost.kv_cache_bytes(CompressionPlan(), arch, w) == 2 * 4 * 2 * 16 * 100 * 3 * 2
    vectors = 2 * 4 * 2 * 100 * 3
    assert cost.kv_cache_bytes(CompressionPlan(kv_cache_bits=8), arch, w) == vectors * 16 + vectors * 2


def test_memory_and_latency_fall_with_bits(tiny):
    arch = tiny.arch
    profile = hw_profiles.load("raspberry-pi-5-8gb")
    w = cost.Workload(256, 1, 64)
    estimates = []
    for bits in (16, 8, 4):
        plan = CompressionPlan(precision={x.name: LayerPrecision(bits) for x in cost.stored_layers(arch)})
        estimates.append(cost.estimate(plan, arch, profile, w))
    totals = [e.memory.total for e in estimates]
    assert totals[0] > totals[1] > totals[2]
    assert estimates[0].memory.weights + estimates[0].memory.embedding == 2 * sum(
        x.params for x in cost.stored_layers(arch))
    decode = [e.latency.decode_s_per_token for e in estimates]
    assert decode[0] > decode[1] > decode[2]
    assert estimates[0].latency.energy_j_per_token == pytest.approx(decode[0] * profile.power_watts)


def test_roofline_by_hand():
    from llmtailor.hw_profiles import roofline

    p = hw_profiles.DeviceProfile("d", "d", 10**9, 10**9, 10.0, {"fp32": 1.0}, 5.0, bandwidth_efficiency=0.5,
                                  compute_efficiency=0.25, layer_overhead_us=100)
    memory_bound = roofline.Operation(flops=1e6, bytes=1e9, precision="fp32")  # 1e9 B / 5e9 B/s = 0.2 s
    compute_bound = roofline.Operation(flops=1e12, bytes=1.0, precision="fp32")  # 1e12 / 2.5e11 = 4 s
    assert roofline.seconds(memory_bound, p) == pytest.approx(0.2)
    assert roofline.seconds(compute_bound, p) == pytest.approx(4.0)
    assert roofline.total_seconds([memory_bound, compute_bound], p, blocks=10) == pytest.approx(4.201)
    slow_fp32 = dataclasses.replace(p, bandwidth_efficiency_by_precision={"fp32": 0.25})
    assert roofline.seconds(memory_bound, slow_fp32) == pytest.approx(0.4)
    # An operation's own rates: a kernel's peak (derated like the rest), a reached read rate (not derated).
    kernel = roofline.Operation(flops=1e12, bytes=1.0, precision="fp32", tflops=0.5)  # 1e12 / (0.5e12 * 0.25) = 8 s
    assert roofline.seconds(kernel, p) == pytest.approx(8.0)
    own_read = roofline.Operation(flops=1e6, bytes=1e9, precision="fp32", read_gbps=2.0)  # 1e9 / 2e9 = 0.5 s
    assert roofline.seconds(own_read, p) == pytest.approx(0.5)


def test_a_prompt_head_rate_and_weight_only_kernel_rates_price_prefill_only(tiny):
    arch = tiny.arch  # tied embeddings: the head reads the embedding matrix
    w = cost.Workload(256, 1, 64)
    base = hw_profiles.DeviceProfile("d", "d", 10**9, 10**9, 10.0, {"fp32": 1.0, "fp16": 2.0}, 5.0,
                                     kernels=frozenset({"int8_weight_only"}))
    head_bytes = arch.vocab_size * arch.hidden_size * 2
    slow_head = dataclasses.replace(base, prompt_head_read_gbps={"fp16": {f"{arch.vocab_size}x{arch.hidden_size}": 0.01,
                                                                          "100000x4096": 50.0}})
    dense = CompressionPlan()
    before, after = cost.latency(dense, arch, base, w), cost.latency(dense, arch, slow_head, w)
    assert after.decode_s_per_token == before.decode_s_per_token
    head_before = max(head_bytes / (10e9 * 0.7), 2.0 * arch.vocab_size * arch.hidden_size / (2e12 * 0.5))
    assert after.prefill_s - before.prefill_s == pytest.approx(head_bytes / 0.01e9 - head_before)
    int8 = CompressionPlan(precision={x.name: LayerPrecision(8, 0, symmetric=True) for x in arch.linears})
    slow_kernel = dataclasses.replace(base, weight_only_tflops={"int8": 1e-3})
    fused, slowed = cost.latency(int8, arch, base, w), cost.latency(int8, arch, slow_kernel, w)
    flops = 2.0 * w.prompt_length * sum(x.params for x in arch.linears)
    assert slowed.prefill_s - fused.prefill_s == pytest.approx(flops / (1e9 * 0.5) - flops / (2e12 * 0.5), rel=1e-3)
    # A dequantized (unfused) layer and a dense plan do not use the kernel's rate.
    assert cost.latency(dense, arch, slow_kernel, w).prefill_s == before.prefill_s
    # Elementwise work: tokens x (hidden + MLP width) per block, at the profile's time per value, in prefill only.
    elementwise = dataclasses.replace(base, prefill_ns_per_value={"fp16": 2.0})
    priced = cost.latency(dense, arch, elementwise, w)
    values = arch.num_layers * w.prompt_length * (arch.hidden_size + arch.intermediate_size)
    assert priced.prefill_s - before.prefill_s == pytest.approx(values * 2e-9)
    assert priced.decode_s_per_token == before.decode_s_per_token


def test_sparsity_speeds_up_only_with_a_kernel(tiny):
    arch = tiny.arch
    w = cost.Workload(256, 1, 64)
    sparse = CompressionPlan(sparsity={x.name: LayerSparsity(0.5, "2:4") for x in arch.linears})
    for name, faster in (("raspberry-pi-5-8gb", False), ("rtx-4090-24gb", True)):
        profile = hw_profiles.load(name)
        dense_s = cost.latency(CompressionPlan(), arch, profile, w).prefill_s
        sparse_s = cost.latency(sparse, arch, profile, w).prefill_s
        assert (sparse_s < dense_s) is faster
        assert cost.memory(sparse, arch, w).weights < cost.memory(CompressionPlan(), arch, w).weights


def test_float32_runtime_doubles_what_is_held_dense_and_nothing_quantized(tiny):
    arch = tiny.arch
    half, full = cost.Workload(256, 1, 64), cost.Workload(256, 1, 64, "float32")
    dense = CompressionPlan()
    m16, m32 = cost.memory(dense, arch, half), cost.memory(dense, arch, full)
    assert (m32.weights, m32.embedding, m32.other) == (2 * m16.weights, 2 * m16.embedding, 2 * m16.other)
    assert m32.kv_cache == 2 * m16.kv_cache and m32.activations > m16.activations
    int4 = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in arch.linears})
    assert cost.memory(int4, arch, full).weights == cost.memory(int4, arch, half).weights
    # The stored (packed) form is float16 whatever the runtime holds.
    assert cost.weight_bytes(dense, arch) == m16.weights + m16.embedding
    with pytest.raises(ValueError, match="dense dtype"):
        cost.Workload(dense_dtype="int8")


def test_memory_holds_what_the_runtime_holds_beyond_the_stored_form(tiny):
    """With a profile: its runtime's own memory, weights a kernel holds twice while loading, and the dense head
    copied for a prompt's last position where the profile prices that copy."""
    import dataclasses

    arch = tiny.arch
    w = cost.Workload(256, 1, 64, "bfloat16")
    base = dataclasses.replace(hw_profiles.load("laptop-x86-16gb"), kernels=frozenset({"int8_activations"}),
                               runtime_overhead_bytes=1000, prompt_head_read_gbps={}, weight_copies_at_load={})
    int8 = CompressionPlan(precision={x.name: LayerPrecision(8, 0, act_bits=8) for x in arch.linears})
    plain = cost.memory(int8, arch, w, base)
    assert plain.overhead == 1000 and plain.weights == cost.memory(int8, arch, w).weights
    twice = cost.memory(int8, arch, w, dataclasses.replace(base, weight_copies_at_load={"int8_activations": 2.0}))
    assert twice.weights == 2 * plain.weights and twice.activations == plain.activations
    weight_only = CompressionPlan(precision={x.name: LayerPrecision(8, 0) for x in arch.linears})
    assert cost.memory(weight_only, arch, w, dataclasses.replace(base, weight_copies_at_load={"int8_activations": 2.0})
                       ).weights == cost.memory(weight_only, arch, w).weights  # another kernel (none here): once
    shape = f"{arch.vocab_size}x{arch.hidden_size}"
    copying = dataclasses.replace(base, prompt_head_read_gbps={"fp16": {shape: 1.0}})
    head = arch.vocab_size * arch.hidden_size * 2
    assert cost.memory(CompressionPlan(), arch, w, copying).activations == plain.activations + head
    assert cost.memory(CompressionPlan(), arch, cost.Workload(256, 1, 64, "float32"), copying).activations == \
        cost.memory(CompressionPlan(), arch, cost.Workload(256, 1, 64, "float32"), base).activations  # fp32: no copy
    quantized_head = CompressionPlan(precision={arch.embedding.name: LayerPrecision(8, 0)})
    assert cost.memory(quantized_head, arch, w, copying).activations == plain.activations
    assert cost.estimate(CompressionPlan(), arch, copying, w).memory == cost.memory(CompressionPlan(), arch, w, copying)


def test_int8_activation_layers_pay_their_per_call_work_per_value(tiny):
    import dataclasses

    arch = tiny.arch
    w = cost.Workload(256, 1, 64, "float32")
    host_like = dataclasses.replace(hw_profiles.load("laptop-x86-16gb"), kernels=frozenset({"int8_activations"}))
    int8 = CompressionPlan(precision={x.name: LayerPrecision(8, 0, act_bits=8) for x in arch.linears})
    before = cost.latency(int8, arch, host_like, w)
    after = cost.latency(int8, arch, dataclasses.replace(host_like, int8_activation_ns_per_value=2.0), w)
    values = sum(x.in_features + x.out_features for x in arch.linears)
    assert after.prefill_s - before.prefill_s == pytest.approx(values * w.prompt_length * 2e-9)
    assert after.decode_s_per_token - before.decode_s_per_token == pytest.approx(values * 2e-9)
    dense = CompressionPlan()  # no int8 layer: nothing added
    assert cost.latency(dense, arch, dataclasses.replace(host_like, int8_activation_ns_per_value=2.0), w) == \
        cost.latency(dense, arch, host_like, w)


def test_a_weight_only_kernel_streams_at_its_own_share_of_the_bandwidth(tiny):
    import dataclasses

    arch = tiny.arch
    w = cost.Workload(256, 1, 64)
    a100 = hw_profiles.load("a100-80gb")
    assert a100.weight_only_bandwidth_efficiency == {"int8": 0.524, "int4": 0.423}
    plain = dataclasses.replace(a100, weight_only_bandwidth_efficiency={})
    int4 = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in arch.linears})
    slow, fast = (cost.latency(int4, arch, p, w).decode_s_per_token for p in (a100, plain))
    assert slow > fast  # 42% of the bandwidth where the precision's share is 69%
    dense = CompressionPlan()
    assert cost.latency(dense, arch, a100, w).decode_s_per_token == cost.latency(dense, arch, plain, w).decode_s_per_token


def test_a_format_with_zero_points_runs_at_its_own_rates_where_the_profile_gives_them(tiny):
    import dataclasses

    arch, w = tiny.arch, cost.Workload(256, 1, 64)
    laptop = hw_profiles.load("laptop-x86-16gb")
    own = dataclasses.replace(laptop, weight_only_tflops={"int4": 0.5, "int4_zero_point": 0.05},
                              weight_only_bandwidth_efficiency={"int4": 0.9, "int4_zero_point": 0.3})
    shared = dataclasses.replace(own, weight_only_tflops={"int4": 0.5}, weight_only_bandwidth_efficiency={"int4": 0.9})
    symmetric = CompressionPlan(precision={x.name: LayerPrecision(4, 32, symmetric=True) for x in arch.linears})
    with_zeros = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in arch.linears})
    assert cost.latency(symmetric, arch, own, w) == cost.latency(symmetric, arch, shared, w)
    slow, plain = (cost.latency(with_zeros, arch, p, w) for p in (own, shared))
    assert slow.prefill_s > plain.prefill_s and slow.decode_s_per_token > plain.decode_s_per_token


def test_float32_computes_at_the_float32_rate():
    from llmtailor.hw_profiles import roofline

    host = hw_profiles.DeviceProfile("d", "d", 10**9, 10**9, 10.0, {"fp32": 1.0, "fp16": 4.0}, 5.0)
    assert roofline.compute_precision(host, False, "float32") == "fp32"
    assert roofline.compute_precision(host, False, "bfloat16") == "fp16"


def test_weight_only_formats_pay_a_dequantize_without_a_kernel(tiny):
    arch = tiny.arch
    w = cost.Workload(256, 1, 64)
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in arch.linears})
    base = hw_profiles.DeviceProfile("d", "d", 10**9, 10**9, 10.0, {"fp32": 1.0}, 5.0, layer_overhead_us=0)
    fused = hw_profiles.DeviceProfile("d", "d", 10**9, 10**9, 10.0, {"fp32": 1.0}, 5.0, layer_overhead_us=0,
                                      kernels=frozenset({"int4_weight_only"}))
    dense_s = cost.latency(CompressionPlan(), arch, base, w).decode_s_per_token
    assert cost.latency(plan, arch, fused, w).decode_s_per_token < dense_s
    # Unfused: read the 4-bit codes, write the float16 copy, read it again: slower than plain float16.
    assert cost.latency(plan, arch, base, w).decode_s_per_token > dense_s


@pytest.mark.parametrize("text, expected", [("8GB", 8 * 10**9), ("512 MB", 512 * 10**6), ("1.5GiB", 1.5 * 2**30),
                                            ("100kb", 10**5), ("2048", 2048), ("8g", 8 * 10**9)])
def test_parse_size(text, expected):
    assert hw_profiles.parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["eight GB", "8 parsecs", "", "-1GB", "0GB", "GB8"])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(UserError, match="memory budget"):
        hw_profiles.parse_size(text, "memory budget")


def test_shipped_profiles_load():
    names = hw_profiles.available()
    assert {"raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb",
            "apple-m2-16gb", "iphone-15-pro", "snapdragon-8-gen-3-phone", "laptop-x86-16gb", "rtx-3060-12gb",
            "rtx-4090-24gb", "t4-16gb", "a100-80gb", "h100-80gb"} <= set(names)
    for name in names:
        p = hw_profiles.load(name)
        assert 0 < p.usable_memory_bytes <= p.memory_bytes and p.memory_bandwidth_gbps > 0
        assert p.runtime, f"{name} does not say which runtime its kernels and efficiencies are for"
        assert hw_profiles.DeviceProfile.from_dict(p.to_dict()) == p
    limited = hw_profiles.from_memory("2GB", hw_profiles.load("raspberry-pi-5-8gb"))
    assert limited.usable_memory_bytes == 2 * 10**9 and limited.memory_bandwidth_gbps == 17.1
    assert math.isclose(hw_profiles.from_memory("8GB").usable_memory_bytes, 8e9)


GOOD = Path(hw_profiles.PROFILE_DIR / "raspberry-pi-5-8gb.yaml").read_text()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("power_watts: 7\n", ""), "missing field"),
    (lambda t: t.replace("memory_bandwidth_gbps: 17.1", "memory_bandwidth_gbps: -3"), "non-negative"),
    (lambda t: t.replace("memory_bandwidth_gbps: 17.1", "memory_bandwidth_gbps: fast"), "non-negative number"),
    (lambda t: t + "\ncolour: red\n", "unknown field"),
    (lambda t: t + "\nbandwidth_efficiency_by_precision: {fp8: 0.5}\n", "bandwidth_efficiency_by_precision maps"),
    (lambda t: t + "\nbandwidth_efficiency_by_precision: {fp32: 1.5}\n", "shares in \\(0, 1\\]"),
    (lambda t: t.replace("usable_memory: 7.25GiB", "usable_memory: 9GiB"), "larger than memory"),
    (lambda t: t + "\nweight_only_tflops: {int3: 0.5}\n", "weight_only_tflops maps"),
    (lambda t: t + "\nweight_only_tflops: {int4_zero_points: 0.5}\n", "weight_only_tflops maps"),
    (lambda t: t + "\nprefill_ns_per_value: {fp32: -1}\n", "prefill_ns_per_value maps .* non-negative"),
    (lambda t: t + "\nprompt_head_read_gbps: {fp16: {49152x576: 0}}\n", "prompt_head_read_gbps.fp16 maps"),
    (lambda t: t + "\nprompt_head_read_gbps: {fp16: {wide: 1}}\n",
     "prompt_head_read_gbps.fp16 maps head shapes VOCABxWIDTH \\(such as 49152x576\\) to positive numbers, got wide"),
    (lambda t: t + "\nprompt_head_read_gbps: {fp16: 1}\n", "mappings of head shapes"),
    (lambda t: t + "\nprompt_head_read_gbps: [1, 2]\n", "prompt_head_read_gbps must be a dict"),
    (lambda t: t.replace("int8_activations]", "warp_drive]"), "unknown kernels"),
    (lambda t: t + "\nweight_copies_at_load: {int8_activations: 0.5}\n", "weight_copies_at_load counts copies"),
    (lambda t: t + "\nweight_only_bandwidth_efficiency: {int4: 1.5}\n", "weight_only_bandwidth_efficiency maps .* \\(0, 1\\]"),
    (lambda t: t + "\nweight_only_bandwidth_efficiency: {fp16: 0.5}\n", "weight_only_bandwidth_efficiency maps"),
    (lambda t: t + "\nweight_copies_at_load: {warp_drive: 2}\n", "weight_copies_at_load maps"),
    (lambda t: t + "\n  : : [\n", "not valid YAML"),
    (lambda t: "- just\n- a list\n", "mapping"),
    (lambda t: t.replace("runtime: llama.cpp (CPU, NEON)", "runtime: 3"), "runtime must be a str"),
])
def test_bad_profile_yaml(tmp_path, edit, message):
    path = tmp_path / "device.yaml"
    path.write_text(edit(GOOD))
    with pytest.raises(UserError, match=message):
        hw_profiles.load(str(path))


def test_unknown_device_names_the_choices():
    with pytest.raises(UserError, match="unknown device 'toaster'.*raspberry-pi-5-8gb"):
        hw_profiles.load("toaster")


def test_calibrate_measures_this_machine_into_the_host_profile(monkeypatch, tmp_path, capsys):
    import torch

    from llmtailor import cli
    from llmtailor.hw_profiles import host

    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path))
    assert "typical laptop CPU" in hw_profiles.from_memory("8GB").description
    with pytest.raises(UserError, match="no host profile yet: measure it with `llmtailor devices --calibrate`"):
        hw_profiles.load("host")
    real_measure = host.measure
    monkeypatch.setattr(host, "measure", lambda: real_measure(probe_bytes=32 << 20))
    monkeypatch.setattr(host, "matmul_tflops", lambda dtype: 0.05 if dtype == torch.float32 else 0.02)
    probes = iter([(0.08, 0.3), (0.2, 0.1), (0.1, 0.5)])  # the int8 layer is probed three times: medians are kept
    monkeypatch.setattr(host, "int8_dynamic_rates", lambda: next(probes))
    monkeypatch.setattr(host, "int8_dynamic_weight_copies", lambda: 2.03)
    monkeypatch.setattr(host, "weight_only_tflops", lambda bits: 0.03 if bits == 8 else 0.0)  # no int4 kernel
    monkeypatch.setattr(host, "prompt_head_read_gbps", lambda dtype, vocab, width, repeats:
                        5.0 if dtype == torch.float32 else width / 1000)
    monkeypatch.setattr(host, "FIT_WIDTHS", (64, 128))
    monkeypatch.setattr(host, "runtime_bytes", lambda: 300 << 20)
    assert cli.main(["devices", "--calibrate"]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = hw_profiles.load("host")
    assert profile.peak_tflops["int8"] > 0 and profile.memory_bandwidth_gbps > 0.1
    assert 0 < profile.peak_tflops["fp32"] < 1000 and 0 < profile.peak_tflops["fp16"] < 1000
    assert "int8_activations" in profile.kernels and profile.weight_copies_at_load == {"int8_activations": 2.03}
    assert profile.int8_activation_ns_per_value == 0.3
    assert profile.peak_tflops["int8"] == pytest.approx(0.1 * min(1.0, profile.peak_tflops["fp16"] / 0.02), rel=1e-3)
    assert "0.08, 0.2, 0.1" in host.profile_path().read_text()  # the probes, recorded
    assert profile.prompt_head_read_gbps["fp16"]["49152x576"] == 0.576 and "fp32" not in profile.prompt_head_read_gbps
    assert profile.prompt_head_gbps("fp16", 49152, 600) == 0.576  # the nearest measured shape
    assert profile.prompt_head_gbps("fp16", 150000, 1500) == 1.536 and profile.prompt_head_gbps("fp32", 10, 10) is None
    assert set(profile.weight_only_tflops) == {"int8"} and profile.weight_only_tflops["int8"] <= 0.03
    assert 0 < profile.usable_memory_bytes <= profile.memory_bytes and profile.layer_overhead_us >= 0
    assert 0 < profile.bandwidth_efficiency <= 1  # measured: one-token matmuls against the read probe
    budget = hw_profiles.from_memory("8GB")  # --memory alone now runs at this machine's speeds
    assert budget.peak_tflops == profile.peak_tflops and "measured" in budget.description
    assert cli.main(["devices"]) == 0 and "this machine" in capsys.readouterr().out


def test_the_read_probe_and_matmul_measure_something_plausible():
    import torch

    from llmtailor.hw_profiles import host

    assert 0.1 < host.read_bandwidth_gbps(16 << 20, repeats=2) < 5000
    timings = host.time_decoders(4 << 20, prompt=16, steps=4, repeats=1, widths=(64, 128), rounds=2)
    fitted = host.fit_decoders(timings)
    assert len(timings) == 4 and all(t.decode_s > 0 and t.prefill_s > 0 for t in timings)
    assert fitted["decode_read_gbps"] > 0 and fitted["block_overhead_us"] >= 0 and fitted["fp32_prefill_tflops"] > 0
    # Products of tens of millions of operations, milliseconds each: at one million (64 x 128 x 256), a CPU shared
    # with other work stretched a call to tens of milliseconds, below the floor (the 24th session's CI beside a
    # benchmark measured 7e-5 TFLOPS); the floor is for a units slip, far below any real machine.
    assert 1e-4 < host.matmul_tflops(torch.float32, 64, 512, 1024, repeats=5) < 1000
    assert 1e-4 < host.int8_dynamic_tflops(64, 512, 1024, repeats=5) < 1000  # this build has a quantized engine
    rate, per_value = host.int8_dynamic_rates(16, repeats=1)
    assert 1e-4 < rate < 1000 and 0 <= per_value < 1000
    assert 1.0 <= host.int8_dynamic_weight_copies(1024, 1024, 4) < 4  # packing what was loaded: about 2 here
    for bits in (8, 4):  # this build has both fused CPU weight-only kernels
        assert 1e-4 < host.weight_only_tflops(bits, 64, 512, 1024, repeats=5) < 1000
    assert 0.01 < host.prompt_head_read_gbps(torch.bfloat16, 4096, 256, 16, repeats=2) < 5000
    assert 50 << 20 < host.runtime_bytes() < 4 << 30  # python, torch and transformers take some memory


def test_the_decoder_fit_recovers_known_figures():
    from llmtailor.hw_profiles import host

    # Timings made from 15 / 20 GB/s, 100 us per block, 0.2 / 0.8 TFLOPS, 0 / 3 ns per elementwise value: the fit
    # gives them back.
    timings = [host.DecoderTiming(dtype, blocks, size, flops, flops / rate + values * ns * 1e-9 + blocks * 1e-4,
                                  size / read + blocks * 1e-4, values)
               for dtype, rate, read, ns in (("float32", 0.2e12, 15e9, 0.0), ("bfloat16", 0.8e12, 20e9, 3.0))
               for blocks, size, flops, values in ((24, 300e6, 2e10, 6e6), (6, 400e6, 3e10, 3e6),
                                                   (2, 350e6, 2.5e10, 1e6))]
    fitted = host.fit_decoders(timings)
    assert fitted["fp32_decode_read_gbps"] == pytest.approx(15.0) and fitted["bf16_decode_read_gbps"] == pytest.approx(20.0)
    assert 15.0 < fitted["decode_read_gbps"] < 20.0
    assert fitted["block_overhead_us"] == pytest.approx(100.0)
    assert fitted["fp32_prefill_tflops"] == pytest.approx(0.2) and fitted["bf16_prefill_tflops"] == pytest.approx(0.8)
    assert fitted["fp32_prefill_ns_per_value"] == pytest.approx(0.0, abs=1e-9)
    assert fitted["bf16_prefill_ns_per_value"] == pytest.approx(3.0)


def test_the_decoder_fit_never_gives_a_negative_rate_or_overhead():
    from llmtailor.hw_profiles import host

    # Cache-resident stacks: the time is all per-block cost, and bigger stacks happen to be a bit quicker per byte.
    timings = [host.DecoderTiming(dtype, blocks, size, 1e9, 0.01, blocks * 2e-4 - size * 1e-13)
               for dtype in ("float32", "bfloat16") for blocks, size in ((80, 4e6), (20, 8e6), (5, 16e6))]
    fitted = host.fit_decoders(timings)
    assert fitted["block_overhead_us"] > 0 and fitted["fp32_decode_read_gbps"] > 0
    assert fitted["bf16_decode_read_gbps"] > 0 and fitted["fp32_prefill_tflops"] > 0
