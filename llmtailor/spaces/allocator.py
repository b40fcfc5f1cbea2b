"""The budget allocator: the per-layer choice that loses least quality within a byte budget.

Each layer has options (a precision, its exact bytes from the cost model, its predicted
damage from the sensitivities); exactly one option per layer is chosen so that the
summed damage is smallest and the summed bytes stay within the budget. This is a
multiple-choice knapsack, solved exactly as a 0/1 integer program with
``scipy.optimize.milp`` (HiGHS): one binary per (layer, option), one equality per
layer, one budget row. A tied embedding/head is one layer like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtailor.errors import UserError
from llmtailor.plan import LayerPrecision
from llmtailor.quiet import c_output_silenced

FEASIBILITY_TOLERANCE = 1e-6  # HiGHS's MIP feasibility tolerance (scipy's milp does not let it be set)


@dataclass(frozen=True)
class Option:
    """One way to store a layer: its precision, its bytes and the damage it is predicted to do."""

    precision: LayerPrecision
    bytes: int
    damage: float


def allocate(options: dict[str, list[Option]], budget_bytes: int) -> dict[str, Option]:
    """The option of every layer that minimizes the summed damage with the summed bytes within the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(options)
    if not names or any(not options[n] for n in names):
        raise ValueError("every layer needs at least one option")
    smallest = sum(min(o.bytes for o in options[n]) for n in names)
    if smallest > budget_bytes:
        raise UserError(f"no allocation fits {budget_bytes:,} bytes: the smallest option of every layer adds up to "
                        f"{smallest:,} bytes")
    flat = [(i, o) for i, n in enumerate(names) for o in options[n]]
    cost = np.array([o.damage for _, o in flat], dtype=float)
    sizes = np.array([o.bytes for _, o in flat], dtype=float)
    choose_one = np.zeros((len(names), len(flat)))
    for column, (row, _) in enumerate(flat):
        choose_one[row, column] = 1
    # Bytes are scaled to the budget so the solver's tolerances act on a number near 1, not on billions. HiGHS
    # accepts a row violated within its feasibility tolerance (about 1e-6 of the budget: on the default model a
    # solution 16 bytes over a 131 MB budget came back five times while the row was tightened by the excess alone),
    # so a solution over the budget is solved again with the row tightened by at least that tolerance, doubling.
    limit = 1.0
    for attempt in range(8):
        constraints = [LinearConstraint(choose_one, 1, 1), LinearConstraint(sizes[None, :] / budget_bytes, -np.inf, limit)]
        with c_output_silenced():  # HiGHS writes debugging lines to descriptor 2 on some problems
            result = milp(cost, constraints=constraints, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
                          options={"mip_rel_gap": 0.0})  # proven optimal, not within a gap
        if not result.success:
            raise RuntimeError(f"the allocator's integer program failed: {result.message}")
        chosen = {names[row]: option for (row, option), x in zip(flat, result.x, strict=True) if x > 0.5}
        excess = sum(o.bytes for o in chosen.values()) - budget_bytes
        if excess <= 0:
            return chosen
        limit -= max(excess / budget_bytes, FEASIBILITY_TOLERANCE) * 2**attempt
    raise RuntimeError("the allocator could not bring its solution within the budget")
