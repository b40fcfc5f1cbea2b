"""Structured cuts: a really smaller model that saves, reloads and computes what the masked teacher computes."""

from __future__ import annotations

import pytest
import torch

from llmtailor import arch as arch_module
from llmtailor.compression import calibration, structure
from llmtailor.evaluators import cost
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, PlanError, Student


@pytest.fixture(scope="module")
def scores(tiny):
    from llmtailor import text

    windows = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=4, tokens=64)
    stats = calibration.collect(tiny.model, tiny.arch, windows)
    return structure.importance(tiny.model, tiny.arch, stats, windows), windows


@pytest.mark.parametrize("student", [
    Student(layers=(0, 2, 3)),
    Student(heads={b: 2 for b in range(4)}),
    Student(mlp_width={b: 96 for b in range(4)}),
    Student(layers=(1, 3), heads={1: 2, 3: 2}, mlp_width={1: 40, 3: 40}),
], ids=["blocks", "kv-groups", "mlp", "all-three"])
def test_a_cut_model_is_smaller_reloads_and_matches_the_masked_teacher(tiny, scores, student, tmp_path):
    from transformers import AutoModelForCausalLM

    scores, windows = scores
    chosen = structure.choose(tiny.arch, student, scores)
    small = structure.cut(tiny.model, tiny.arch, chosen)
    reference = structure.masked(tiny.model, tiny.arch, chosen)
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    predicted = arch_module.cut(tiny.arch, *student.uniform_cut(tiny.arch.num_layers))
    assert sum(p.numel() for p in reloaded.parameters()) == predicted.total_params < tiny.arch.total_params
    with torch.no_grad():
        ids = windows[:2, :32]
        expected = reference(input_ids=ids).logits
        assert torch.allclose(small(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        # Generation with a KV cache works on the cut model (its blocks are renumbered).
        out = reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 12)


def test_the_cost_model_prices_a_cut_from_the_plan_alone(tiny):
    student = Student(layers=(0, 1, 3), heads={b: 2 for b in (0, 1, 3)}, mlp_width={b: 80 for b in (0, 1, 3)})
    plan = CompressionPlan(student=student)
    small = arch_module.cut(tiny.arch, *student.uniform_cut(4))
    workload = cost.Workload(context_length=256)
    assert cost.weight_bytes(plan, tiny.arch) == cost.weight_bytes(CompressionPlan(), small)
    assert cost.kv_cache_bytes(plan, tiny.arch, workload) == cost.kv_cache_bytes(CompressionPlan(), tiny.arch, workload) * 3 // 8
    # Quantization and sparsity compose with the cut, by the teacher's layer names.
    name = next(lin.name for lin in tiny.arch.linears if lin.block == 3 and lin.kind == "down_proj")
    both = CompressionPlan(student=student, precision={name: LayerPrecision(4, 32)}, sparsity={name: LayerSparsity(0.5)})
    expected = cost.tensor_bytes(tiny.arch.hidden_size, 80, LayerPrecision(4, 32), LayerSparsity(0.5)).total
    assert cost.weight_bytes(plan, tiny.arch) - cost.weight_bytes(both, tiny.arch) == 2 * tiny.arch.hidden_size * 80 - expected


def test_cuts_that_cannot_be_made_are_one_line_errors(tiny, scores):
    scores, _ = scores
    with pytest.raises(PlanError, match="must be the same in every kept block"):
        Student(heads={0: 2, 1: 4, 2: 4, 3: 4}).uniform_cut(4)
    with pytest.raises(PlanError, match="must be the same in every kept block"):
        Student(mlp_width={0: 80}).uniform_cut(4)  # blocks 1-3 unnamed
    with pytest.raises(PlanError, match="student heads in block 0 must be a positive multiple of 2"):
        CompressionPlan(student=Student(heads={b: 3 for b in range(4)})).validate(tiny.arch)  # breaks the KV groups
    with pytest.raises(PlanError, match="up to 4, got 6"):
        CompressionPlan(student=Student(heads={b: 6 for b in range(4)})).validate(tiny.arch)
    with pytest.raises(PlanError, match="student layers must be distinct indices"):
        CompressionPlan(student=Student(layers=())).validate(tiny.arch)  # every block removed
    with pytest.raises(PlanError, match="keeps between 1 and 4 blocks, got 0"):
        structure.blocks_to_keep(scores.blocks, 0)


def test_block_influence_ranks_a_block_that_does_nothing_last(tiny, scores):
    scores, windows = scores
    assert len(scores.blocks) == 4 and all(0 <= b <= 2 for b in scores.blocks)
    idle = structure.masked(tiny.model, tiny.arch, structure.choose(tiny.arch, Student(layers=(0, 2, 3)), scores))
    influence = structure.block_influence(idle, tiny.arch, windows)
    assert influence[1] == pytest.approx(0, abs=1e-6) and structure.blocks_to_keep(influence, 3) == (0, 2, 3)


def test_a_plan_cuts_then_prunes_and_quantizes_and_packs_to_the_cost_models_bytes(tiny, scores):
    from llmtailor import compression
    from llmtailor.compression import calibration as calibration_module

    scores, windows = scores
    stats = calibration_module.collect(tiny.model, tiny.arch, windows)
    student = Student(layers=(0, 2, 3), heads={b: 2 for b in (0, 2, 3)}, mlp_width={b: 96 for b in (0, 2, 3)})
    names = [lin.name for lin in tiny.arch.linears]
    plan = CompressionPlan(student=student, precision={n: LayerPrecision(4, 32, method="gptq") for n in names[::2]},
                           sparsity={n: LayerSparsity(0.5, "2:4", "sparsegpt") for n in names[1::3]})
    with pytest.raises(PlanError, match="structured cuts choose what goes by importance"):
        compression.apply(plan, tiny.model, tiny.arch, stats)
    model = compression.apply(plan, tiny.model, tiny.arch, stats, importance=scores)
    packed = compression.pack(plan, tiny.model, tiny.arch, stats, importance=scores)
    assert sum(p.nbytes for p in packed.values()) == cost.weight_bytes(plan, tiny.arch)
    chosen = structure.choose(tiny.arch, student, scores)
    for name, stored in packed.items():
        weight = model.get_submodule(chosen.module_name(name, tiny.arch)).weight.data
        quantized = plan.precision_of(name).bits < 16
        assert torch.equal(stored.unpack(), weight if quantized else weight.half().float()), name
    assert sum(p.numel() for p in model.parameters()) == arch_module.cut(tiny.arch, *student.uniform_cut(4)).total_params


def _prune_params(space, arch, **chosen):
    params = {**space.direct.uniform_precision(arch, 4, 32), "cut_blocks": 0.0, "cut_heads": 0.0,
              "cut_mlp": 0.0, "prune_pattern": "dense"}
    return {**params, **chosen}


def test_the_prune_space_writes_the_cut_by_influence_and_solves_sparsegpt_in_input_order(tiny, scores):
    from llmtailor import compression, spaces
    from llmtailor.spaces.base import BlockScores

    importance, windows = scores
    stats = calibration.collect(tiny.model, tiny.arch, windows)
    space = spaces.get("prune").with_blocks(BlockScores((0.1, 0.5, 0.3, 0.9), (0.01, 0.02, 0.03, 0.04)))
    plan = space.plan(_prune_params(space, tiny.arch, cut_blocks=0.2, cut_heads=0.33, cut_mlp=0.25,
                                    prune_pattern="4:8", prune_method="sparsegpt"), tiny.arch)
    assert plan.student.layers == (1, 2, 3)  # block 0 has the least influence
    assert set(plan.student.heads.values()) == {2} and set(plan.student.mlp_width.values()) == {120}
    assert not any(".layers.0." in name for name in {*plan.precision, *plan.sparsity})
    pruned = [n for n in plan.sparsity if plan.precision_of(n).method == "gptq"]
    assert pruned and all(plan.sparsity[n].pattern == "4:8" and not plan.precision[n].act_order for n in pruned)
    assert plan.precision[tiny.arch.embedding.name].act_order  # not pruned: the GPTQ recipe's act-order stays
    model = compression.apply(plan, tiny.model, tiny.arch, stats, importance=importance)
    packed = compression.pack(plan, tiny.model, tiny.arch, stats, importance=importance)
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 120
    assert sum(p.nbytes for p in packed.values()) == cost.weight_bytes(plan, tiny.arch)


def test_the_prune_space_spreads_one_ratio_by_outliers_and_unbound_keeps_the_first_blocks(tiny):
    from llmtailor import spaces
    from llmtailor.spaces.base import BlockScores

    unbound = spaces.get("prune")
    params = _prune_params(unbound, tiny.arch, cut_blocks=0.2, prune_pattern="unstructured", prune_ratio=0.5,
                           owl=True, prune_method="wanda")
    plan = unbound.plan(params, tiny.arch)
    assert plan.student.layers == (0, 1, 2) and {s.ratio for s in plan.sparsity.values()} == {0.5}
    bound = unbound.with_blocks(BlockScores((0.4, 0.3, 0.2, 0.1), (0.04, 0.01, 0.02, 0.03)))
    owl = bound.plan(params, tiny.arch)
    ratios = {b: owl.sparsity[next(n for n in owl.sparsity if f".layers.{b}." in n)].ratio for b in (0, 1, 2)}
    assert ratios[0] < ratios[2] < ratios[1]  # most outliers, least pruned
    assert 3 not in bound.block_ratios(params, [0, 1, 2])  # block 3 is cut: the ratio is spread over the rest
    assert sum(ratios.values()) == pytest.approx(1.5, abs=1e-3)
    assert all(p.act_order for p in owl.precision.values())  # Wanda keeps GPTQ's act-order
    assert cost.weight_bytes(owl, tiny.arch) == pytest.approx(cost.weight_bytes(plan, tiny.arch), rel=0.02)


def test_the_prune_space_samples_what_its_params_say_and_nothing_smaller_than_its_smallest(tiny):
    import optuna

    from llmtailor import spaces
    from llmtailor.spaces.base import BlockScores

    space = spaces.get("prune").with_blocks(BlockScores((0.4, 0.3, 0.2, 0.1), (0.04, 0.01, 0.02, 0.03)))
    smallest = cost.weight_bytes(space.smallest(tiny.arch), tiny.arch)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in space.baselines(tiny.arch):
        study.enqueue_trial(params)
    for _ in range(len(space.baselines(tiny.arch)) + 25):
        trial = study.ask()
        plan = space.sample(trial, tiny.arch)
        assert plan == space.plan(trial.params, tiny.arch)
        plan.validate(tiny.arch)
        assert cost.weight_bytes(plan, tiny.arch) >= smallest
        study.tell(trial, 0.0)
    assert {t.params["prune_pattern"] for t in study.trials} == {"dense", "unstructured", "2:4", "4:8"}


def test_cut_layers_are_cached_under_what_the_cut_kept(tiny, scores, tmp_path):
    from llmtailor import compression
    from llmtailor.compression.layer_cache import LayerCache, model_fingerprint

    importance, windows = scores
    stats = calibration.collect(tiny.model, tiny.arch, windows)
    cache = LayerCache(tmp_path, model_fingerprint(tiny.model), "calibration-1")
    gptq = LayerPrecision(4, 32, method="gptq")
    linears = [lin.name for lin in tiny.arch.linears]

    def plan(width: int) -> CompressionPlan:
        return CompressionPlan(precision=dict.fromkeys(linears, gptq),
                               sparsity=dict.fromkeys(linears, LayerSparsity(0.5, "unstructured", "sparsegpt")),
                               student=Student(heads={b: 2 for b in range(4)}, mlp_width={b: width for b in range(4)}))

    fresh = compression.apply(plan(96), tiny.model, tiny.arch, stats, importance=importance)
    compression.apply(plan(96), tiny.model, tiny.arch, stats, cache, importance=importance)
    assert (cache.hits, cache.misses) == (0, len(linears))
    cached = compression.apply(plan(96), tiny.model, tiny.arch, stats, cache, importance=importance)
    assert cache.hits == len(linears)
    for a, b in zip(fresh.parameters(), cached.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-3)  # cached weights are float16 codes' dequantized values
    narrower = compression.apply(plan(64), tiny.model, tiny.arch, stats, cache, importance=importance)
    assert narrower.config.intermediate_size == 64  # another cut of the MLP: new entries, not the width-96 ones
    assert cache.misses == len(linears) + 3 * 4
