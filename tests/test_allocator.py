"""The budget allocator returns the true optimum and never exceeds the budget."""

from __future__ import annotations

import itertools
import random

import pytest

from llmtailor.errors import UserError
from llmtailor.plan import LayerPrecision
from llmtailor.spaces.allocator import Option, allocate


def random_options(layers: int, seed: int) -> dict[str, list[Option]]:
    rng = random.Random(seed)
    options = {}
    for i in range(layers):
        width = rng.randint(1, 9) * 1000
        # Fewer bits: fewer bytes, more damage (with noise, so the choice is not just "the most bits that fit").
        options[f"layer{i}"] = [Option(LayerPrecision(bits), width * bits + rng.randint(0, 500),
                                       rng.uniform(0.5, 1.5) * 2.0 ** -bits * width) for bits in (2, 3, 4, 8)]
    return options


# The default; 0: no dynamic program, so branching and HiGHS (as on a model too large for the table).
@pytest.mark.parametrize("table_cells", [20_000_000, 0])
@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_brute_force_optimum_within_the_budget(seed, table_cells, monkeypatch):
    from llmtailor.spaces import allocator

    monkeypatch.setattr(allocator, "TABLE_CELLS", table_cells)
    options = random_options(5, seed)
    names = list(options)
    smallest = sum(min(o.bytes for o in options[n]) for n in names)
    largest = sum(max(o.bytes for o in options[n]) for n in names)
    for budget in (smallest, (smallest + largest) // 2, smallest + (largest - smallest) // 5, largest):
        chosen = allocate(options, budget)
        assert set(chosen) == set(names)
        assert sum(o.bytes for o in chosen.values()) <= budget
        best = min((combo for combo in itertools.product(*options.values()) if sum(o.bytes for o in combo) <= budget),
                   key=lambda combo: sum(o.damage for o in combo))
        assert sum(o.damage for o in chosen.values()) == pytest.approx(sum(o.damage for o in best), rel=1e-9)


@pytest.mark.parametrize("table_cells", [20_000_000, 0])
@pytest.mark.parametrize("seed", range(2))
def test_a_large_problem_with_a_lumpy_layer_matches_the_integer_program(seed, table_cells, monkeypatch):
    """200 layers and one as big as 40 of them (the tied embedding of a small model): the allocator against
    HiGHS on the whole problem, at budgets across the range."""
    from llmtailor.spaces import allocator
    from llmtailor.spaces.allocator import damage, solve_exactly

    monkeypatch.setattr(allocator, "TABLE_CELLS", table_cells)
    options = random_options(200, seed)
    options["embedding"] = [Option(LayerPrecision(bits), 200_000 * bits, random.Random(seed).uniform(0.5, 1.5)
                                   * 2.0 ** -bits * 200_000) for bits in (2, 3, 4, 8, 16)]
    smallest = sum(min(o.bytes for o in options[n]) for n in options)
    largest = sum(max(o.bytes for o in options[n]) for n in options)
    for share in (0.05, 0.55, 0.8):
        budget = smallest + int(share * (largest - smallest))
        chosen = allocate(options, budget)
        whole = solve_exactly(options, budget, scale=damage(chosen))
        assert set(chosen) == set(options) and sum(o.bytes for o in chosen.values()) <= budget
        assert damage(chosen) <= damage(whole) * (1 + 1e-6)


def test_a_budget_below_every_allocation_is_a_clear_error():
    options = random_options(3, 0)
    smallest = sum(min(o.bytes for o in options[n]) for n in options)
    with pytest.raises(UserError, match="no allocation fits"):
        allocate(options, smallest - 1)


def test_a_budget_tight_to_the_byte_is_kept():
    options = {f"l{i}": [Option(LayerPrecision(4), 10**8 + i, 1.0), Option(LayerPrecision(8), 2 * 10**8 + i, 0.1)]
               for i in range(20)}
    budget = sum(o.bytes for o in (options[n][1] if i < 7 else options[n][0] for i, n in enumerate(options)))
    chosen = allocate(options, budget)
    assert sum(o.bytes for o in chosen.values()) <= budget
    assert sum(o.precision.bits == 8 for o in chosen.values()) == 7


def test_a_solution_over_the_budget_within_the_solvers_tolerance_is_solved_again():
    """Two big layers whose best options are together 16 bytes over a 131 MB budget: within HiGHS's feasibility
    tolerance, so the first solve returns them (the default model's guided space hit this in a sweep)."""
    half = 65_485_392
    from llmtailor.spaces.allocator import solve_exactly

    options = {name: [Option(LayerPrecision(), half, 0.0), Option(LayerPrecision(4), 10, 100.0)] for name in "ab"}
    for solve in (allocate, solve_exactly):  # (allocate's relaxation counts bytes exactly and needs no HiGHS here)
        chosen = solve(options, 2 * half - 16)
        assert sum(o.bytes for o in chosen.values()) <= 2 * half - 16
        assert sum(o.damage for o in chosen.values()) == 100.0


def test_what_a_c_library_prints_to_the_descriptors_is_silenced_and_they_come_back(capfd):
    import os

    from llmtailor.quiet import c_output_silenced

    with c_output_silenced((1, 2)):
        os.write(1, b"a line per tensor\n")
        os.write(2, b"HighsMipSolverData::transformNewIntegerFeasibleSolution\n")
    os.write(2, b"after\n")
    out, err = capfd.readouterr()
    assert out == "" and err == "after\n"
