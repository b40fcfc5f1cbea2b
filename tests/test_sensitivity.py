"""Per-layer sensitivity: measured at an anchor, carried to other options by the layer's output error."""

from __future__ import annotations

import pytest
import torch

from llmtailor import text
from llmtailor.compression import calibration
from llmtailor.evaluators import quality
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import LayerPrecision
from llmtailor.search import sensitivity

OPTIONS = [LayerPrecision(bits, 32, method="gptq") for bits in (8, 4, 3, 2)]


@pytest.fixture(scope="module")
def setting(tiny):
    splits = text.split("pydoc")
    windows = calibration.calibration_windows(tiny.tokenizer, splits.calibration, count=4, tokens=64)
    stats = calibration.collect(tiny.model, tiny.arch, windows)
    reference = quality.Reference(tiny.model, tiny.tokenizer, splits.evaluation, windows=2, window_tokens=64)
    return stats, reference


def test_sensitivities_rank_options_and_match_the_anchor_measurement(tiny, setting):
    stats, reference = setting
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    layers = [lin.name for lin in stored_layers(tiny.arch)][::5]
    built = sensitivity.build(tiny.model, tiny.arch, OPTIONS, OPTIONS[2], stats, reference, layers=layers)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items()), "the teacher was left changed"
    assert set(built.anchor_kl) == set(layers) and built.anchor == "gptq-3b-g32"
    for layer in layers:
        errors = [built.errors[layer][sensitivity.option_name(o)] for o in OPTIONS]
        assert errors == sorted(errors) and errors[0] > 0, "fewer bits must do more damage to the layer's output"
        assert built.damage(layer, "gptq-3b-g32") == pytest.approx(max(built.anchor_kl[layer], 0.0))
        if built.anchor_kl[layer] > 0:
            assert built.damage(layer, "gptq-8b-g32") < built.damage(layer, "gptq-2b-g32")
        else:  # a layer of this random model whose KL is float noise (-7e-9 on one CPU): no damage is predicted
            assert built.damage(layer, "gptq-8b-g32") == built.damage(layer, "gptq-2b-g32") == 0
    assert sum(built.anchor_kl[layer] > 0 for layer in layers) >= len(layers) - 1
    measured = sensitivity.single_layer_kl(tiny.model, tiny.arch, layers[1], OPTIONS[2], stats, reference)
    assert measured == pytest.approx(built.anchor_kl[layers[1]])


def test_sensitivities_are_stored_and_a_damaged_file_is_rebuilt(tmp_path):
    made = sensitivity.Sensitivity("a", {"l": 0.5}, {"l": {"a": 2.0, "b": 1.0}})
    path = tmp_path / "sens.json"
    assert sensitivity.load_or_build(path, lambda: made) == made
    assert sensitivity.load_or_build(path, lambda: pytest.fail("rebuilt a good file")) == made
    assert made.damage("l", "b") == pytest.approx(0.25)
    path.write_text("{not json")
    assert sensitivity.load_or_build(path, lambda: made) == made


def test_kendall_tau():
    assert sensitivity.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sensitivity.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
