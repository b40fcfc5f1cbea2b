import optuna
import pytest

from llmtailor import spaces
from llmtailor.errors import UserError
from llmtailor.evaluators.cost import weight_bytes


@pytest.mark.parametrize("name", ["coarse", "per-layer"])
def test_sampled_plans_are_valid_and_never_smaller_than_the_smallest(tiny, name):
    space = spaces.get(name)
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
