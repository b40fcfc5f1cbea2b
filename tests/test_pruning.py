"""Pruning: magnitude, Wanda and SparseGPT (alone and joint with GPTQ), their patterns, counts and bytes."""

from __future__ import annotations

import pytest
import torch

from llmtailor import compression
from llmtailor.compression import sparsify
from llmtailor.compression.calibration import output_error
from llmtailor.compression.layer_cache import LayerCache, model_fingerprint
from llmtailor.compression.packing import pack_layer
from llmtailor.evaluators.cost import kept_per_row, tensor_bytes
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError

PATTERNS = [LayerSparsity(0.5, method=m) for m in ("magnitude", "wanda", "sparsegpt")]


def outlier_layer(out: int = 64, width: int = 320, tokens: int = 4096, seed: int = 0):
    """A layer whose inputs have a few outlier features (100 times the others' scale), as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(width)
    scale[torch.randperm(width, generator=g)[:8]] = 100.0
    mixing = torch.eye(width) + 0.1 * torch.randn(width, width, generator=g)
    x = (torch.randn(tokens, width, generator=g) @ mixing) * scale
    return torch.randn(out, width, generator=g), x.T @ x / tokens


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_patterns_keep_exactly_n_of_every_m(method, pattern):
    weight, hessian = outlier_layer()
    n, m = (int(x) for x in pattern.split(":"))
    sparsity = LayerSparsity(1 - n / m, pattern, method)
    pruned, mask = sparsify.PRUNERS[method](weight, sparsity, hessian)
    assert (mask.reshape(-1, m).sum(dim=1) == n).all()
    assert torch.equal(pruned[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.61])
def test_unstructured_pruning_removes_the_asked_share(ratio):
    weight, hessian = outlier_layer()
    out, width = weight.shape
    for method in ("magnitude", "wanda"):  # the same count in every row
        _, mask = sparsify.PRUNERS[method](weight, LayerSparsity(ratio, method=method), hessian)
        assert (mask.sum(dim=1) == kept_per_row(width, LayerSparsity(ratio))).all()
    # SparseGPT compares weights across rows within a block of columns: rows differ, the total is exact.
    _, mask = sparsify.sparsegpt(weight, LayerSparsity(ratio, method="sparsegpt"), hessian)
    assert int(mask.sum()) == out * kept_per_row(width, LayerSparsity(ratio))
    assert len(set(mask.sum(dim=1).tolist())) > 1


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_a_layer_with_outlier_inputs(pattern):
    weight, hessian = outlier_layer()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned, _ = sparsify.PRUNERS[method](weight, LayerSparsity(0.5, pattern, method), hessian)
        errors[method] = output_error(weight, pruned, hessian)
    assert errors["wanda"] < 0.5 * errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


def test_wanda_weighs_each_weight_by_its_inputs_norm():
    """On inputs of equal scale Wanda is magnitude pruning; an input with a large norm keeps its weights."""
    weight = torch.randn(8, 16)
    hessian = torch.eye(16)
    _, by_wanda = sparsify.wanda(weight, LayerSparsity(0.5, method="wanda"), hessian)
    _, by_magnitude = sparsify.magnitude(weight, LayerSparsity(0.5))
    assert torch.equal(by_wanda, by_magnitude)
    hessian[3, 3] = 1e6
    _, by_wanda = sparsify.wanda(weight, LayerSparsity(0.5, method="wanda"), hessian)
    assert by_wanda[:, 3].all()


@pytest.mark.parametrize("sparsity", [LayerSparsity(0.5, method="sparsegpt"), LayerSparsity(0.5, "2:4", "sparsegpt"),
                                      LayerSparsity(0.4, method="wanda")], ids=["sparsegpt", "sparsegpt-2:4", "wanda"])
@pytest.mark.parametrize("precision", [LayerPrecision(), LayerPrecision(4, 128, method="gptq"),
                                       LayerPrecision(3, 0, method="rtn")], ids=["16-bit", "gptq-4b-g128", "rtn-3b"])
def test_pruned_layers_pack_to_the_cost_models_bytes_and_unpack_exactly(sparsity, precision):
    weight, hessian = outlier_layer()
    dense, quantized, mask = compression.compress_layer(weight, precision, sparsity, hessian)
    assert torch.equal(dense[~mask], torch.zeros(int((~mask).sum())))
    packed = pack_layer(dense, quantized, mask, precision, sparsity)
    assert packed.nbytes == tensor_bytes(*weight.shape, precision, sparsity).total
    expected = dense.half().float() if quantized is None else dense  # 16-bit weights are stored as float16
    assert torch.equal(packed.unpack(), expected)


def test_sparsegpt_with_gptq_prunes_and_quantizes_in_one_solve():
    weight, hessian = outlier_layer()
    sparsity, precision = LayerSparsity(0.5, method="sparsegpt"), LayerPrecision(4, 64, method="gptq")
    assert sparsify.joint(precision, sparsity)
    dense, quantized, mask = compression.compress_layer(weight, precision, sparsity, hessian)
    assert quantized.codes.max() <= 15 and torch.equal(dense[~mask], torch.zeros(int((~mask).sum())))
    # One solve does better than pruning (updating the kept weights) and then quantizing what is left.
    pruned, _ = sparsify.sparsegpt(weight, sparsity, hessian)
    two_steps = compression.compress_layer(pruned, LayerPrecision(4, 64), LayerSparsity(), hessian)[0]
    assert output_error(weight, dense, hessian) < output_error(weight, two_steps, hessian)


def test_calibrated_pruning_needs_statistics_and_refuses_act_order_in_the_joint_solve(tiny):
    name = tiny.arch.linears[0].name
    for method in ("wanda", "sparsegpt"):
        plan = CompressionPlan(sparsity={name: LayerSparsity(0.5, method=method)})
        with pytest.raises(PlanError, match=f"^{method} needs calibration statistics"):
            compression.apply(plan, tiny.model, tiny.arch)
    plan = CompressionPlan(sparsity={name: LayerSparsity(0.5, method="sparsegpt")},
                           precision={name: LayerPrecision(4, 32, method="gptq", act_order=True)})
    with pytest.raises(PlanError, match="set act_order=False"):
        compression.check_supported(plan, True, tiny.arch)
    with pytest.raises(PlanError, match="unknown pruning method 'obs'"):
        compression.check_supported(CompressionPlan(sparsity={name: LayerSparsity(0.5, method="obs")}), True)


@pytest.fixture(scope="module")
def stats(tiny):
    from llmtailor import text
    from llmtailor.compression import calibration

    windows = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=8, tokens=64)
    return calibration.collect(tiny.model, tiny.arch, windows), windows


def test_a_pruned_model_packs_as_it_applies_and_sparsegpt_layers_come_from_the_cache(tiny, stats, tmp_path):
    stats, windows = stats
    layers = [lin.name for lin in tiny.arch.linears]
    plan = CompressionPlan(sparsity={n: LayerSparsity(0.5, "2:4" if i % 2 else "unstructured", "sparsegpt" if i % 3 else "wanda")
                                     for i, n in enumerate(layers)},
                           precision={n: LayerPrecision(4, 32, method="gptq") for n in layers[::4]})
    cache = LayerCache(tmp_path, model_fingerprint(tiny.model), "calibration-1")
    model = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    packed = compression.pack(plan, tiny.model, tiny.arch, stats)
    for name in layers:
        stored = packed[name].unpack()
        assert torch.equal(stored, model.get_submodule(name).weight.data.half().float()
                           if plan.precision_of(name).bits == 16 else model.get_submodule(name).weight.data), name
    solved = [n for n in layers if plan.sparsity_of(n).method == "sparsegpt" or plan.precision_of(n).bits < 16]
    assert (cache.hits, cache.misses) == (0, len(solved))
    again = compression.apply(plan, tiny.model, tiny.arch, stats, cache)
    assert cache.hits == len(solved)
    for name in layers:
        assert torch.equal(again.get_submodule(name).weight, model.get_submodule(name).weight), name


def test_sequential_mode_prunes_each_block_on_the_pruned_blocks_before_it(tiny, stats):
    from llmtailor.compression.sequential import compress_sequential

    stats, windows = stats
    plan = CompressionPlan(sparsity={x.name: LayerSparsity(0.5, method="wanda") for x in tiny.arch.linears})
    sequential = compress_sequential(plan, tiny.model, tiny.arch, windows)
    teacher_inputs = compression.apply(plan, tiny.model, tiny.arch, stats)
    for lin in tiny.arch.linears:
        a, b = sequential.get_submodule(lin.name).weight, teacher_inputs.get_submodule(lin.name).weight
        assert (a != 0).float().mean() == pytest.approx(0.5, abs=0.01)
        if lin.block == 0:  # block 0 sees the teacher's embeddings in both modes
            assert torch.equal(a != 0, b != 0), lin.name


def test_owl_ratios_prune_blocks_with_more_outliers_less_and_keep_the_mean(tiny, stats):
    from llmtailor.compression import outliers

    shares = outliers.outlier_shares(tiny.model, tiny.arch, stats[0])
    assert set(shares) == set(range(tiny.arch.num_layers)) and all(0 <= s < 1 for s in shares.values())
    ratios = outliers.layer_ratios({0: 0.01, 1: 0.03, 2: 0.02, 3: 0.05}, 0.6)
    assert sum(ratios.values()) / 4 == pytest.approx(0.6)
    assert ratios[3] < ratios[1] < ratios[2] < ratios[0] and ratios[0] - ratios[3] == pytest.approx(0.16)
    assert outliers.layer_ratios({0: 0.1, 1: 0.1}, 0.5) == {0: 0.5, 1: 0.5}
    assert outliers.layer_ratios({0: 0.01, 1: 0.05}, 0.0) == {0: 0.0, 1: 0.0}


def test_pruning_plans_that_cannot_be_made_are_one_line_errors(tiny):
    name = next(lin.name for lin in tiny.arch.linears if lin.in_features == 160)  # down_proj: 160 inputs
    for bad, message in [(lambda: LayerSparsity(-0.1), r"ratio must be in \[0, 1\)"),
                         (lambda: LayerSparsity(1.0, method="wanda"), r"ratio must be in \[0, 1\)"),
                         (lambda: LayerSparsity(0.0, "4:4"), "0 < N < M"),
                         (lambda: CompressionPlan(sparsity={name: LayerSparsity(0.5, "6:12")}).validate(tiny.arch),
                          "input width is not a multiple of M")]:
        with pytest.raises(PlanError, match=message) as caught:
            bad()
        assert "\n" not in str(caught.value)
