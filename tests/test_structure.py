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
