import optuna
import pytest

from llmtailor import spaces
from llmtailor.errors import UserError
from llmtailor.evaluators.cost import weight_bytes


@pytest.mark.parametrize("name", ["coarse", "per-layer", "quant", "prune", "distill", "joint", "joint-guided"])
def test_sampled_plans_are_valid_and_never_smaller_than_the_smallest(tiny, name):
    space = spaces.get(name)
    if space.needs_sensitivity:  # damage that grows as bits fall, the same for every layer
        space = space.with_sensitivity(type("Sensitivity", (), {"damage": lambda self, layer, option: 1 / len(option)})())
    smallest = weight_bytes(space.smallest(tiny.arch), tiny.arch)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        plan = space.sample(trial, tiny.arch)
        plan.validate(tiny.arch)
        assert weight_bytes(plan, tiny.arch) >= smallest
        assert space.plan(trial.params, tiny.arch) == plan
        study.tell(trial, 0.0)
    for params in space.baselines(tiny.arch):
        assert weight_bytes(space.plan(params, tiny.arch), tiny.arch) >= smallest


def test_coarse_space_groups_bits_by_depth_and_sparsity_by_part(tiny):
    trial = optuna.create_study().ask()
    spaces.get("coarse").sample(trial, tiny.arch)
    bits = sorted(k for k in trial.params if k.startswith("bits_"))
    assert bits == ["bits_attn_0", "bits_attn_1", "bits_attn_2", "bits_mlp_0", "bits_mlp_1", "bits_mlp_2"]
    assert sorted(k for k in trial.params if k.startswith("sparsity_")) == ["sparsity_attn", "sparsity_mlp"]
    per_layer = optuna.create_study().ask()
    spaces.get("per-layer").sample(per_layer, tiny.arch)
    assert sum(k.startswith("bits_") for k in per_layer.params) == len(tiny.arch.linears)


def test_unknown_space():
    with pytest.raises(UserError, match="unknown search space"):
        spaces.get("everything")


def _fake_sensitivity(arch):
    """Damage that grows as bits fall and differs by layer, in the shape search.sensitivity gives."""
    from llmtailor.search.sensitivity import Sensitivity, option_name
    from llmtailor.spaces.guided import GuidedSpace

    errors, anchor_kl = {}, {}
    for i, lin in enumerate(GuidedSpace.layers(arch)):
        anchor_kl[lin.name] = 0.01 * (1 + i % 5)
        errors[lin.name] = {option_name(p): 4.0 ** (8 - p.bits) * (1.3 if p.group_size == 0 else 1.0)
                            for p in GuidedSpace.options(lin, arch)}
    return Sensitivity(option_name(GuidedSpace.anchor(arch.linears[0], arch)), anchor_kl, errors)


def test_guided_space_spends_a_sampled_budget_on_the_least_damage(tiny):
    from llmtailor.evaluators.cost import stored_layers
    from llmtailor.search.sensitivity import option_name
    from llmtailor.spaces.guided import _byte_range

    unbound = spaces.get("guided")
    with pytest.raises(RuntimeError, match="with_sensitivity"):
        unbound.plan({"weight_budget": 0.5}, tiny.arch)
    space = unbound.with_sensitivity(_fake_sensitivity(tiny.arch))
    smallest = weight_bytes(space.smallest(tiny.arch), tiny.arch)
    low, high = _byte_range(tiny.arch)
    damages = []
    for share in (0.0, 0.1, 0.3, 0.6, 1.0):
        plan = space.plan({"weight_budget": share}, tiny.arch)
        plan.validate(tiny.arch)
        assert weight_bytes(plan, tiny.arch) <= low + round(share * (high - low))  # never over the budget
        assert weight_bytes(plan, tiny.arch) >= smallest
        assert all(p.method == "gptq" for p in plan.precision.values())
        damages.append(sum(space.sensitivity.damage(name, option_name(p)) for name, p in plan.precision.items()))
    assert damages == sorted(damages, reverse=True) and damages[-1] == 0  # more bytes, less damage; all of it: dense
    assert space.plan({"weight_budget": 1.0}, tiny.arch).precision == {}
    # The tied embedding is one of the allocator's layers.
    assert tiny.arch.embedding.name in space.plan({"weight_budget": 0.0}, tiny.arch).precision
    assert len(stored_layers(tiny.arch)) == len(space.layers(tiny.arch))
    for params in space.baselines(tiny.arch):
        assert 0.0 <= params["weight_budget"] <= 1.0
    assert space.budget_share(tiny.arch, low) == 0.0 and space.budget_share(tiny.arch, high) == 1.0
    assert space.budget_share(tiny.arch, (low + high) // 2) == pytest.approx(0.5, abs=1e-3)
    trial = optuna.create_study().ask()
    assert space.sample(trial, tiny.arch) == space.plan(trial.params, tiny.arch)


def test_direct_space_quantizes_with_gptq_and_rtn_spaces_do_not(tiny):
    from llmtailor.compression.calibration import GPTQ_ACT_ORDER, GPTQ_DAMP, GPTQ_SHRINK

    params = {"group_size": 128, "embed_bits": 8, "sparsity_attn": 0.0, "sparsity_mlp": 0.0,
              **{f"bits_{k}": 4 for k in spaces.get("direct").keys(spaces.get("direct").bits_grouping, tiny.arch)}}
    direct = spaces.get("direct").plan(params, tiny.arch)
    assert {(p.method, p.act_order, p.damp, p.shrink) for p in direct.precision.values()} == {
        ("gptq", GPTQ_ACT_ORDER, GPTQ_DAMP, GPTQ_SHRINK)}
    assert spaces.get("direct").calibrated and not spaces.get("coarse").calibrated
    assert {p.method for p in spaces.get("coarse").plan(params, tiny.arch).precision.values()} == {"rtn"}


def test_the_distill_space_distills_only_cut_students_for_a_sampled_budget(tiny):
    space, study = spaces.get("distill"), optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    budgets = set()
    for _ in range(40):
        trial = study.ask()
        plan = space.sample(trial, tiny.arch)
        cut = plan.student.layers is not None or plan.student.heads or plan.student.mlp_width
        assert cut or plan.student.distillation.steps == 0
        assert not plan.sparsity
        budgets.add(plan.student.distillation.steps)
        study.tell(trial, 0.0)
    assert budgets == set(space.choices.distill_steps) and space.distills


def test_a_space_may_offer_students_trained_in_every_weight_besides_adapters(tiny, tmp_path):
    from llmtailor.spaces.joint import DISTILL_FULL_LEARNING_RATE, DISTILL_LEARNING_RATE, DISTILL_LORA_RANK

    assert "distill_lora_ranks" not in spaces.get("distill").choices.to_dict()  # the default: stored studies resume
    path = tmp_path / "ranks.yaml"
    path.write_text("preset: distill\ndistill_steps: [40]\ndistill_lora_ranks: [0, 16]\n")
    space = spaces.get(str(path))
    assert space.choices.to_dict()["distill_lora_ranks"] == [0, 16]
    study, recipes = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)), set()
    for _ in range(30):
        trial = study.ask()
        recipe = space.sample(trial, tiny.arch).student.distillation
        if recipe.steps:
            assert recipe.lora_rank == trial.params["distill_lora_rank"]
            recipes.add((recipe.lora_rank, recipe.learning_rate))
        cut = any(trial.params.get(k) for k in ("cut_blocks", "cut_heads", "cut_mlp"))
        assert ("distill_lora_rank" in trial.params) == cut  # sampled only where a student would train
        study.tell(trial, 0.0)
    assert recipes == {(0, DISTILL_FULL_LEARNING_RATE), (16, DISTILL_LEARNING_RATE)}
    path.write_text("preset: distill\ndistill_lora_ranks: 0\n")  # one value: every student trains every weight
    baseline = spaces.get(str(path)).plan(spaces.get(str(path)).baselines(tiny.arch)[-1], tiny.arch)
    assert baseline.student.distillation.steps and baseline.student.distillation.lora_rank == 0
    assert spaces.get("distill").plan(spaces.get("distill").baselines(tiny.arch)[-1],
                                      tiny.arch).student.distillation.lora_rank == DISTILL_LORA_RANK
    path.write_text("distill_lora_ranks: [-1]\n")
    with pytest.raises(UserError, match=r"distill_lora_ranks: \[-1\] must be distinct adapter ranks >= 0"):
        spaces.get(str(path))


def test_a_users_yaml_narrows_a_preset_and_bad_files_are_one_line_errors(tiny, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: prune\nbits: [8, 4]\nprune_patterns: [dense, '2:4']\ncut_blocks: 0.0\n")
    space = spaces.get(str(path))
    assert space.name == "prune+mine" and space.choices.bits == (8, 4) and space.choices.cut_blocks == (0.0,)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        plan = space.sample(trial, tiny.arch)
        assert {p.bits for p in plan.precision.values()} <= {8, 4} and plan.student.layers is None
        assert {s.pattern for s in plan.sparsity.values()} <= {"2:4"}
        assert "cut_blocks" not in trial.params  # one value: fixed, not sampled
        study.tell(trial, 0.0)
    for params in space.baselines(tiny.arch):  # only baselines the choices can express
        assert all(v in (8, 4) for k, v in params.items() if k.startswith("bits_") or k == "embed_bits")
    for content, message in [("colour: red\n", "unknown key.*colour"), ("preset: tiny\n", "unknown preset"),
                             ("bits: [5]\n", "bits"), ("prune_ratios: [1.5]\n", "prune_ratios"),
                             ("precision: exact\n", "precision"), ("- 1\n", "expected a mapping"),
                             ("bits: [\n", "cannot read")]:
        path.write_text(content)
        with pytest.raises(UserError, match=message) as raised:
            spaces.get(str(path))
        assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="does not exist"):
        spaces.get(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_every_sampler_draws_from_the_joint_space_with_constraints_and_several_objectives(tiny, sampler):
    import warnings

    from llmtailor.search.samplers import SAMPLERS

    space = spaces.get("joint")
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=SAMPLERS[sampler](0))
    for params in space.baselines(tiny.arch):
        study.enqueue_trial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(14):
            trial = study.ask()
            plan = space.sample(trial, tiny.arch)
            size = weight_bytes(plan, tiny.arch)
            trial.set_constraint("over_budget", size - 200_000)
            study.tell(trial, [size, float(len(plan.sparsity))])
    assert len({t.params.get("prune_pattern") for t in study.trials}) > 1


def test_joint_guided_asks_the_sensitivities_the_guided_space_asks(tiny):
    joint, guided = spaces.get("joint-guided"), spaces.get("guided")
    assert joint.needs_sensitivity and joint.layers(tiny.arch) == guided.layers(tiny.arch)
    for lin in joint.layers(tiny.arch):
        assert joint.options(lin, tiny.arch) == guided.options(lin, tiny.arch)
        assert joint.anchor(lin, tiny.arch) == guided.anchor(lin, tiny.arch)


def test_the_gp_sampler_scores_candidates_in_blocks_with_the_values_of_one_evaluation(monkeypatch):
    """GPSampler's acquisition over 2,048 candidates at once grew with the front (memory); in blocks it must give
    the same values (search.samplers)."""
    import warnings

    import numpy as np
    from optuna._gp import acqf

    from llmtailor.search import samplers

    sampler = samplers.SAMPLERS["gp"](0)
    in_blocks = acqf.BaseAcquisitionFunc.eval_acqf_no_grad
    assert in_blocks.in_blocks and samplers.score_candidates_in_blocks()  # patched once, idempotent
    seen = []

    def spy(self, x):
        if x.ndim == 2 and len(x) > samplers.ACQUISITION_ROWS:
            seen.append((self, x))
        return in_blocks(self, x)

    monkeypatch.setattr(acqf.BaseAcquisitionFunc, "eval_acqf_no_grad", spy)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for _ in range(13):
            trial = study.ask()
            b, c = trial.suggest_float("b", 0, 1), trial.suggest_int("c", 0, 2)
            study.tell(trial, [(1 - b) ** 2 + 0.1 * c + 0.01 * rng.random(), b, 1 - 0.3 * c])
    assert seen, "the sampler never scored a batch of candidates"
    self, x = seen[-1]
    np.testing.assert_allclose(in_blocks(self, x), in_blocks.whole(self, x), rtol=1e-9, atol=1e-12)


def test_an_optuna_without_the_gp_method_to_patch_is_left_alone_with_a_warning(monkeypatch):
    from optuna._gp import acqf

    from llmtailor.search import samplers

    monkeypatch.setattr(acqf, "BaseAcquisitionFunc", type("Renamed", (), {}))
    with pytest.warns(UserWarning, match="no GP acquisition function to score in blocks"):
        assert samplers.score_candidates_in_blocks() is False
