"""GPTQ and the calibration statistics it stands on."""

from __future__ import annotations

import pytest
import torch

from llmtailor import compression, text
from llmtailor.compression import calibration
from llmtailor.compression.calibration import output_error
from llmtailor.compression.packing import pack_layer
from llmtailor.compression.quantize import gptq, rtn
from llmtailor.errors import UserError
from llmtailor.evaluators.cost import stored_layers, tensor_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError


def correlated_layer(out: int = 48, width: int = 96, tokens: int = 2048, seed: int = 0):
    """A weight matrix and the H of inputs whose features are strongly correlated and unequal in scale."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) * torch.linspace(0.1, 3, width)
    x = torch.randn(tokens, width, generator=g) @ mixing
    return torch.randn(out, width, generator=g), x.T @ x / tokens


@pytest.mark.parametrize("precision", [
    LayerPrecision(4, 32, method="gptq"), LayerPrecision(4, 0, method="gptq"), LayerPrecision(3, 32, method="gptq"),
    LayerPrecision(4, 32, method="gptq", act_order=True), LayerPrecision(2, 0, method="gptq", act_order=True),
    LayerPrecision(4, 40, symmetric=True, method="gptq"),  # a short last group: 96 = 2 x 40 + 16
], ids=["4b-g32", "4b-channel", "3b-g32", "4b-g32-act-order", "2b-channel-act-order", "4b-g40-symmetric"])
def test_gptq_error_is_below_rtn_on_correlated_inputs(precision):
    weight, hessian = correlated_layer()
    ours = gptq(weight, precision, hessian)
    baseline = rtn(weight, LayerPrecision(precision.bits, precision.group_size, precision.symmetric))
    assert output_error(weight, ours.dequantize(), hessian) < 0.8 * output_error(weight, baseline.dequantize(), hessian)
    assert ours.codes.max() <= 2**precision.bits - 1


@pytest.mark.parametrize("group_size", [32, 0])
def test_shrinking_h_moves_gptq_from_the_papers_solution_to_rtn(group_size):
    """shrink 0 is the paper's GPTQ; shrink 1 keeps only diag H, so no error is spread and the codes are RTN's."""
    weight, hessian = correlated_layer()
    errors = []
    for shrink in (0.0, 0.5, 1.0):
        q = gptq(weight, LayerPrecision(4, group_size, method="gptq", shrink=shrink), hessian)
        errors.append(output_error(weight, q.dequantize(), hessian))
    baseline = rtn(weight, LayerPrecision(4, group_size))
    assert torch.equal(q.codes, baseline.codes) and torch.equal(q.scales, baseline.scales)
    assert errors[0] < errors[1] < errors[2]  # on the calibration statistics themselves, the paper's is best


def test_gptq_keeps_pruned_weights_at_zero_and_packs_to_the_cost_models_bytes():
    weight, hessian = correlated_layer(width=320)  # wider than one block of 128 columns, and not a multiple of it
    sparsity = LayerSparsity(0.5, "2:4")
    for precision in (LayerPrecision(4, 32, method="gptq"), LayerPrecision(3, 0, method="gptq", act_order=True)):
        dense, quantized, mask = compression.compress_layer(weight, precision, sparsity, hessian)
        assert torch.equal(dense[~mask], torch.zeros_like(dense[~mask]))
        packed = pack_layer(dense, quantized, mask, precision, sparsity)
        assert packed.nbytes == tensor_bytes(*weight.shape, precision, sparsity).total
        assert torch.equal(packed.unpack(), dense)


def test_gptq_without_statistics_is_a_clear_error(tiny):
    plan = CompressionPlan(precision={tiny.arch.linears[0].name: LayerPrecision(4, 32, method="gptq")})
    with pytest.raises(PlanError, match="gptq needs calibration statistics"):
        compression.apply(plan, tiny.model, tiny.arch)
    with pytest.raises(PlanError, match="act_order and shrink apply to calibrated methods"):
        LayerPrecision(4, 32, act_order=True)
    with pytest.raises(PlanError, match="act_order and shrink apply to calibrated methods"):
        LayerPrecision(4, 32, shrink=0.5)
    with pytest.raises(PlanError, match="shrink must be in"):
        LayerPrecision(4, 32, method="gptq", shrink=1.5)
    with pytest.raises(UserError, match="calibration text has \\d+ tokens; one calibration window needs 512"):
        calibration.calibration_windows(tiny.tokenizer, ["a few words"], count=4, tokens=512)
    with pytest.raises(UserError, match="no calibration text"):
        calibration.calibration_windows(tiny.tokenizer, [], count=4, tokens=512)


@pytest.fixture(scope="module")
def stats(tiny):
    windows = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=8, tokens=64)
    return calibration.collect(tiny.model, tiny.arch, windows), windows


def test_statistics_are_shared_by_layers_that_read_one_input(tiny, stats):
    stats, windows = stats
    block = "model.layers.1"
    q, k, v = (stats.input_of[f"{block}.self_attn.{p}_proj"] for p in "qkv")
    gate, up = stats.input_of[f"{block}.mlp.gate_proj"], stats.input_of[f"{block}.mlp.up_proj"]
    assert q == k == v and gate == up and q != gate
    assert stats.input_of[f"{block}.self_attn.o_proj"] == f"{block}.self_attn.o_proj"
    assert len(stats.hessians) == 4 * tiny.arch.num_layers + 1  # qkv, o, gate/up, down per block; the tied head
    assert set(stats.input_of) == {lin.name for lin in stored_layers(tiny.arch)}
    # H equals XᵀX/n of the inputs the layer really sees.
    seen = []
    layer = tiny.model.get_submodule(f"{block}.mlp.down_proj")
    handle = layer.register_forward_pre_hook(lambda m, i: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            tiny.model(input_ids=w[None], use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    assert torch.allclose(stats.hessian(f"{block}.mlp.down_proj"), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert (stats.diagonal(f"{block}.mlp.down_proj") >= 0).all()


def test_block_by_block_statistics_equal_those_of_whole_forward_passes(tiny, stats):
    # collect runs one block at a time and replays the blocks' outputs for the head; the reference hooks every layer
    # in ordinary forward passes of the whole model.
    stats, windows = stats
    reference = calibration.InputStatistics(calibration._layers(tiny.model, tiny.arch))
    with torch.no_grad():
        for w in windows:
            reference.new_pass(w.numel())
            tiny.model(input_ids=w[None], use_cache=False)
    reference = reference.finish()
    assert reference.input_of == stats.input_of and reference.tokens == stats.tokens
    assert set(reference.hessians) == set(stats.hessians)
    for key, matrix in reference.hessians.items():
        assert torch.allclose(stats.hessians[key], matrix, rtol=1e-4, atol=1e-6), key
    # the blocks run as before afterwards (the replay's stand-in forwards are gone)
    logits = tiny.model(input_ids=windows[:1], use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_block_by_block_statistics_of_another_architecture_with_an_untied_head(stats):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmtailor import arch as arch_module

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    arch = arch_module.from_model(model)
    windows = stats[1][:3] % 300
    reference = calibration.InputStatistics(calibration._layers(model, arch))
    with torch.no_grad():
        for w in windows:
            reference.new_pass(w.numel())
            model(input_ids=w[None], use_cache=False)
    reference = reference.finish()
    found = calibration.collect(model, arch, windows)
    assert found.input_of == reference.input_of and "lm_head" in found.input_of
    for key, matrix in reference.hessians.items():
        assert torch.allclose(found.hessians[key], matrix, rtol=1e-4, atol=1e-6), key


def test_statistics_streamed_to_a_file_equal_those_kept_in_memory_and_a_failure_leaves_no_file(tiny, stats, tmp_path,
                                                                                            monkeypatch):
    stats, windows = stats
    streamed = calibration.load_or_collect(tiny.model, tiny.arch, windows, "k2", tmp_path)
    assert streamed.input_of == stats.input_of and streamed.tokens == stats.tokens
    assert all(torch.equal(streamed.hessians[k], stats.hessians[k]) for k in stats.hessians)
    from llmtailor.compression import blocks

    original, calls = blocks.run_block, []

    def failing_at_block_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in block 1")
        return original(*args, **kwargs)

    monkeypatch.setattr(blocks, "run_block", failing_at_block_1)
    with pytest.raises(RuntimeError, match="out of memory in block 1"):
        calibration.load_or_collect(tiny.model, tiny.arch, windows, "k3", tmp_path)
    assert sorted(p.name for p in (tmp_path / "calibration").iterdir()) == ["k2.safetensors"]
    assert not any(module._forward_pre_hooks for module in tiny.model.modules())  # no statistics hook stays behind
    assert all("forward" not in vars(block) for block in tiny.model.model.layers)  # the replay left no stand-ins


def test_gptq_beats_rtn_on_every_layer_of_the_model_under_its_statistics(tiny, stats):
    stats, _ = stats
    wins = 0
    for lin in stored_layers(tiny.arch):
        weight, hessian = tiny.model.get_submodule(lin.name).weight.data, stats.hessian(lin.name)
        if lin.name == tiny.arch.embedding.name:
            weight = tiny.model.get_submodule(tiny.arch.lm_head_name).weight.data
        ours = output_error(weight, gptq(weight, LayerPrecision(3, 32, method="gptq"), hessian).dequantize(), hessian)
        wins += ours < output_error(weight, rtn(weight, LayerPrecision(3, 32)).dequantize(), hessian)
    assert wins == len(stored_layers(tiny.arch))


def test_statistics_are_cached_on_disk_and_a_damaged_file_is_rebuilt(tiny, stats, tmp_path, monkeypatch):
    stats, windows = stats
    first = calibration.load_or_collect(tiny.model, tiny.arch, windows, "k1", tmp_path)
    path = tmp_path / "calibration" / "k1.safetensors"
    assert path.is_file() and not list(path.parent.glob(".*"))
    monkeypatch.setattr(calibration, "collect", lambda *a, **k: pytest.fail("the cached statistics were recomputed"))
    again = calibration.load_or_collect(tiny.model, tiny.arch, windows, "k1", tmp_path)
    assert again.input_of == first.input_of and again.tokens == first.tokens
    assert all(torch.equal(again.hessians[k], first.hessians[k]) for k in first.hessians)
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:1000])
    rebuilt = calibration.load_or_collect(tiny.model, tiny.arch, windows, "k1", tmp_path)
    assert all(torch.allclose(rebuilt.hessians[k], first.hessians[k]) for k in first.hessians)


def test_apply_with_gptq_uses_the_statistics(tiny, stats):
    stats, _ = stats
    plan = CompressionPlan(precision={x.name: LayerPrecision(3, 32, method="gptq") for x in stored_layers(tiny.arch)})
    model = compression.apply(plan, tiny.model, tiny.arch, stats)
    packed = compression.pack(plan, tiny.model, tiny.arch, stats)
    for lin in stored_layers(tiny.arch):
        assert torch.equal(packed[lin.name].unpack(), model.get_submodule(lin.name).weight.data)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_layer_cache_serves_later_trials_and_rebuilds_a_damaged_entry(tiny, stats, tmp_path):
    from llmtailor.compression.layer_cache import LayerCache, model_fingerprint

    stats, _ = stats
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32, method="gptq") for x in tiny.arch.linears[:6]})
    cache = LayerCache(tmp_path, model_fingerprint(tiny.model), "calibration-1")
    first = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert (cache.hits, cache.misses) == (0, 6)
    again = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert (cache.hits, cache.misses) == (6, 6) and cache.hit_rate == 0.5
    for lin in tiny.arch.linears[:6]:
        assert torch.equal(first.get_submodule(lin.name).weight, again.get_submodule(lin.name).weight)
    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 6 and cache.size_bytes() == sum(p.stat().st_size for p in entries)
    damaged = bytearray(entries[0].read_bytes())
    damaged[-1] ^= 0xFF  # one flipped bit in the codes: the header still parses, the checksum does not match
    entries[0].write_bytes(bytes(damaged))
    cache = LayerCache(tmp_path, cache.model, "calibration-1")  # another process, which has not read it yet
    rebuilt = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert cache.rebuilt == 1 and (cache.hits, cache.misses) == (5, 1)
    for lin in tiny.arch.linears[:6]:
        assert torch.equal(first.get_submodule(lin.name).weight, rebuilt.get_submodule(lin.name).weight)
    # Another calibration or other settings are other entries.
    other = LayerCache(tmp_path, cache.model, "calibration-2")
    assert other.key("x", LayerPrecision(4, 32, method="gptq"), LayerSparsity()) != cache.key(
        "x", LayerPrecision(4, 32, method="gptq"), LayerSparsity())
    assert cache.key("x", LayerPrecision(4, 32, method="gptq"), LayerSparsity()) != cache.key(
        "x", LayerPrecision(4, 32, method="gptq", damp=0.1), LayerSparsity())


def test_a_bounded_layer_cache_deletes_the_least_recently_read_entries_and_solves_them_again(tiny, stats, tmp_path):
    from llmtailor.compression.layer_cache import LayerCache, model_fingerprint

    stats, _ = stats
    layers = tiny.arch.linears[:3]
    plans = {bits: CompressionPlan(precision={x.name: LayerPrecision(bits, 32, method="gptq") for x in layers})
             for bits in (4, 3, 2)}  # codes are a byte each whatever the bits: three entries of the same sizes

    def entries():
        return {p.name: p.stat().st_size for p in tmp_path.rglob("*.safetensors")}

    cache = LayerCache(tmp_path, model_fingerprint(tiny.model), "calibration-1")
    first = compression.apply(plans[4], tiny.model, tiny.arch, stats, cache)
    plan_bytes = sum(entries().values())
    cache.max_bytes = int(2.5 * plan_bytes) + 2  # two plans' layers fit, three do not
    compression.apply(plans[3], tiny.model, tiny.arch, stats, cache)
    of = {bits: {cache.key(x.name, plan.precision[x.name], LayerSparsity()) + ".safetensors" for x in layers}
          for bits, plan in plans.items()}
    assert set(entries()) == of[4] | of[3] and cache.evicted == 0
    compression.apply(plans[4], tiny.model, tiny.arch, stats, cache)  # read: now more recent than the 3-bit ones
    compression.apply(plans[2], tiny.model, tiny.arch, stats, cache)
    kept = set(entries())
    assert of[4] | of[2] <= kept, "the entries read or written last are kept"
    assert 1 <= cache.evicted == len(of[3] - kept), "the least recently read go first, and only they"
    assert sum(entries().values()) <= cache.max_bytes
    misses = cache.misses
    compression.apply(plans[3], tiny.model, tiny.arch, stats, cache)  # deleted ones: solved again (and a kept one
    # may go before its turn to be read comes, to make room for them: it is the least recently read)
    assert misses + len(of[3] - kept) <= cache.misses <= misses + 3 and sum(entries().values()) <= cache.max_bytes
    again = compression.apply(plans[4], tiny.model, tiny.arch, stats, cache)
    for lin in layers:
        assert torch.equal(first.get_submodule(lin.name).weight, again.get_submodule(lin.name).weight)


def test_the_layer_cache_bound_comes_from_the_environment(monkeypatch):
    from llmtailor.compression.layer_cache import max_bytes_from_env

    monkeypatch.delenv("LLMTAILOR_LAYER_CACHE_MAX", raising=False)
    assert max_bytes_from_env() == 20 * 10**9
    monkeypatch.setenv("LLMTAILOR_LAYER_CACHE_MAX", "1.5GB")
    assert max_bytes_from_env() == 15 * 10**8
    monkeypatch.setenv("LLMTAILOR_LAYER_CACHE_MAX", "None")
    assert max_bytes_from_env() is None
    monkeypatch.setenv("LLMTAILOR_LAYER_CACHE_MAX", "lots")
    with pytest.raises(UserError, match="malformed LLMTAILOR_LAYER_CACHE_MAX 'lots'"):
        max_bytes_from_env()


def test_a_process_checks_an_entry_once_and_again_when_the_file_is_replaced(tiny, stats, tmp_path, monkeypatch):
    from llmtailor.compression import layer_cache
    from llmtailor.compression.layer_cache import LayerCache, model_fingerprint

    stats, _ = stats
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32, method="gptq") for x in tiny.arch.linears[:3]})
    cache = LayerCache(tmp_path, model_fingerprint(tiny.model), "calibration-1")
    compression.apply(plan, tiny.model, tiny.arch, stats, cache)  # solved and written
    checked = []
    monkeypatch.setattr(layer_cache, "_checksum", lambda t, real=layer_cache._checksum: checked.append(1) or real(t))
    first = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert (cache.hits, len(checked)) == (3, 3)
    compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert (cache.hits, len(checked)) == (6, 3)  # the same files again: not hashed again
    # A file replaced by another process (written aside and renamed: a new inode), here with a flipped code bit.
    entry = sorted(tmp_path.rglob("*.safetensors"))[0]
    damaged = bytearray(entry.read_bytes())
    damaged[-1] ^= 0xFF
    entry.with_suffix(".tmp").write_bytes(bytes(damaged))
    entry.with_suffix(".tmp").rename(entry)
    again = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert cache.rebuilt == 1 and len(checked) == 3 + 2  # only the replaced one: hashed (failed), solved, hashed to store
    for lin in tiny.arch.linears[:3]:
        assert torch.equal(first.get_submodule(lin.name).weight, again.get_submodule(lin.name).weight)


def test_the_model_fingerprint_follows_the_weights(tiny):
    import copy

    from llmtailor.compression.layer_cache import model_fingerprint

    twin = copy.deepcopy(tiny.model)
    assert model_fingerprint(twin) == model_fingerprint(tiny.model)
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert model_fingerprint(twin) != model_fingerprint(tiny.model)


def test_sequential_mode_calibrates_each_block_on_the_compressed_blocks_before_it(tiny, stats):
    from llmtailor.compression.sequential import compress_sequential

    stats, windows = stats
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    rtn_plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in stored_layers(tiny.arch)})
    sequential = compress_sequential(rtn_plan, tiny.model, tiny.arch, windows)
    direct = compression.apply(rtn_plan, tiny.model, tiny.arch)
    for lin in stored_layers(tiny.arch):  # RTN needs no calibration: both modes give the same model
        assert torch.equal(sequential.get_submodule(lin.name).weight, direct.get_submodule(lin.name).weight)

    plan = CompressionPlan(precision={x.name: LayerPrecision(3, 32, method="gptq") for x in stored_layers(tiny.arch)})
    sequential = compress_sequential(plan, tiny.model, tiny.arch, windows)
    teacher_inputs = compression.apply(plan, tiny.model, tiny.arch, stats)
    for lin in tiny.arch.linears:
        same = torch.allclose(sequential.get_submodule(lin.name).weight, teacher_inputs.get_submodule(lin.name).weight,
                              atol=1e-5)
        # Block 0 sees the teacher's embeddings in both modes; every later block sees compressed blocks' outputs.
        assert same == (lin.block == 0), lin.name
    assert sequential.lm_head.weight is sequential.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items()), "the teacher changed"


def test_windows_sampled_from_the_model_are_seeded_and_shaped(tiny):
    first = calibration.generated_windows(tiny.model, tiny.tokenizer, count=5, tokens=12, seed=3, batch=2)
    again = calibration.generated_windows(tiny.model, tiny.tokenizer, count=5, tokens=12, seed=3, batch=2)
    other = calibration.generated_windows(tiny.model, tiny.tokenizer, count=5, tokens=12, seed=4, batch=2)
    assert first.shape == (5, 12) and torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.max()) < len(tiny.tokenizer)
    assert not set(first[:, 0].tolist()) & set(tiny.tokenizer.all_special_ids)


def test_gptq_of_a_large_layer_solved_a_block_of_rows_at_a_time_matches_one_solve(monkeypatch):
    from llmtailor.compression import quantize

    torch.manual_seed(0)
    weight, inputs = torch.randn(96, 64), torch.randn(512, 64)
    hessian = inputs.T @ inputs / 512
    precision = LayerPrecision(4, 32, method="gptq")
    whole = quantize.gptq(weight, precision, hessian)
    monkeypatch.setattr(quantize, "GPTQ_ROW_BLOCK_ELEMENTS", 40 * 64)  # blocks of 40, 40 and 16 rows
    blocked = quantize.gptq(weight, precision, hessian)
    assert (blocked.codes == whole.codes).float().mean() > 0.999
    assert blocked.codes.shape == whole.codes.shape and blocked.scales.shape == whole.scales.shape
    assert torch.allclose(blocked.dequantize(), whole.dequantize(), atol=1e-3)


def test_dequantize_equals_the_codes_scaled_per_group_weight_by_weight():
    from llmtailor.compression.quantize import QuantizedWeight

    torch.manual_seed(0)
    for width, size in ((64, 32), (70, 32), (48, 48)):  # whole groups, a short last group, one group per row
        groups = -(-width // size)
        codes = torch.randint(0, 16, (9, width), dtype=torch.uint8)
        scales, zeros = torch.rand(9, groups).half(), torch.randint(0, 16, (9, groups), dtype=torch.uint8)
        expected = torch.empty(9, width)
        for column in range(width):  # the definition: (code - zero) * scale of the weight's group
            g = column // size
            expected[:, column] = (codes[:, column].float() - zeros[:, g].float()) * scales[:, g].float()
        quantized = QuantizedWeight(codes, scales, zeros, 4, size, False)
        assert torch.equal(quantized.dequantize(), expected)
        into = torch.full((9, width), float("nan"))  # written in place: the tensor a search trial's layer replaces
        assert quantized.dequantize(out=into) is into and torch.equal(into, expected)
    with pytest.raises(ValueError, match="float32"):
        quantized.dequantize(out=torch.empty(9, width, dtype=torch.float16))
