import pytest

from llmtailor.plan import CompressionPlan, Distillation, LayerPrecision, LayerSparsity, PlanError, Student


def full_plan() -> CompressionPlan:
    return CompressionPlan(
        precision={"model.layers.0.mlp.up_proj": LayerPrecision(4, 128, True, "rtn"),
                   "model.embed_tokens": LayerPrecision(8, 0)},
        sparsity={"model.layers.1.self_attn.q_proj": LayerSparsity(0.5, "2:4"),
                  "model.layers.0.mlp.up_proj": LayerSparsity(0.3)},
        student=Student(layers=(0, 1, 3), heads={0: 2}, mlp_width={1: 96},
                        distillation=Distillation(steps=10, temperature=1.5, qat=True)),
        kv_cache_bits=8,
    )


def test_json_round_trip_is_exact():
    plan = full_plan()
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert again.student.heads[0] == 2 and isinstance(again.student.layers, tuple)


def test_plan_is_immutable_and_defaults_are_identity():
    plan = full_plan()
    with pytest.raises(TypeError):
        plan.precision["x"] = LayerPrecision()  # type: ignore[index]
    assert plan.precision_of("not.named").is_identity
    assert plan.sparsity_of("not.named").is_identity
    assert CompressionPlan().student.is_identity


@pytest.mark.parametrize("make, message", [
    (lambda: LayerPrecision(bits=5), "weight bits"),
    (lambda: LayerPrecision(bits=4, group_size=-1), "group_size"),
    (lambda: LayerSparsity(ratio=1.0), "ratio"),
    (lambda: LayerSparsity(0.5, "4:2"), "N:M"),
    (lambda: LayerSparsity(0.3, "2:4"), "ratio=0.5"),
    (lambda: CompressionPlan(kv_cache_bits=3), "kv_cache_bits"),
    (lambda: CompressionPlan.from_json('{"precision": {}, "colour": 1}'), "unknown plan fields"),
    (lambda: CompressionPlan.from_json("[1, 2]"), "object"),
    (lambda: CompressionPlan.from_json("{nope"), "not valid JSON"),
])
def test_malformed_plans_are_refused(make, message):
    with pytest.raises(PlanError, match=message):
        make()


def test_validate_against_architecture(tiny):
    arch = tiny.arch
    CompressionPlan(precision={arch.linears[0].name: LayerPrecision(4)}).validate(arch)
    with pytest.raises(PlanError, match="does not have"):
        CompressionPlan(precision={"model.layers.99.mlp.up_proj": LayerPrecision(4)}).validate(arch)
    with pytest.raises(PlanError, match="tied"):
        CompressionPlan(precision={"lm_head": LayerPrecision(4)}).validate(arch)
    with pytest.raises(PlanError, match="multiple of 2"):
        CompressionPlan(student=Student(heads={0: 3})).validate(arch)
    with pytest.raises(PlanError, match="distinct indices"):
        CompressionPlan(student=Student(layers=(0, 0))).validate(arch)
    with pytest.raises(PlanError, match="not to model.embed_tokens"):
        CompressionPlan(sparsity={"model.embed_tokens": LayerSparsity(0.5)}).validate(arch)


def test_nm_patterns_parse_once():
    from llmtailor.plan import LayerSparsity, nm_pair, nm_ratio

    assert nm_pair("2:4") == (2, 4) and nm_pair("4:8") == (4, 8) and nm_ratio("2:4") == 0.5
    assert nm_pair("unstructured") is None and nm_pair("4:2") is None and nm_pair("0:4") is None
    assert LayerSparsity(0.5, "2:4").nm == (2, 4) and LayerSparsity(0.3).nm is None
