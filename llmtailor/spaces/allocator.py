"""The budget allocator: the per-layer choice that loses least quality within a byte budget.

Each layer has options (a precision, its exact bytes from the cost model, its predicted
damage from the sensitivities); exactly one option per layer is chosen so that the
summed damage is smallest and the summed bytes stay within the budget. This is a
multiple-choice knapsack, solved exactly:

- relaxation: price each byte at λ and let every layer take the option of least
  damage + λ·bytes. For any λ ≥ 0 and any allocation x within the budget,
  damage(x) ≥ L(λ) + Σ reduced costs of x's options, where L(λ) = Σ per-layer least
  (damage + λ·bytes) − λ·budget and an option's reduced cost is how far its
  damage + λ·bytes lies above its layer's least. λ is the damage saved per byte by the
  first upgrade (along each layer's convex hull, best first) that no longer fits: L(λ)
  is then the linear relaxation's optimum, and the upgrades that fit are an allocation.
- fixing: an option whose reduced cost lifts the bound above the best allocation known
  cannot be in a better one and is dropped; on the default model most layers keep one.
- the rest exactly: by dynamic programming over the bytes the free layers may spend
  (``by_table``) where that table is small; else each option of the layer the
  relaxation splits (the lumpy one, often the embedding) is tried in turn, best bound
  first, down to BRANCH_DEPTH, and what is left goes to ``scipy.optimize.milp`` (HiGHS).

On the default model's guided space (bench_allocator_speed.py: 101 budgets across it)
this takes a median 4 ms where HiGHS on the whole problem took 50 ms (mean 29 ms against
163 ms, at most 0.73 s against 1.79 s). It also finds optima HiGHS stopped short of near
16 bits, where the summed damage is about 1e-5: HiGHS stops within an absolute gap of
1e-6 (the savings were at most 1e-6 nats, nothing a measurement would see), so its leaf
problems here are scaled by the best damage known. A tied embedding/head is one layer
like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmtailor.errors import UserError
from llmtailor.plan import LayerPrecision
from llmtailor.quiet import c_output_silenced

FEASIBILITY_TOLERANCE = 1e-6  # HiGHS's MIP feasibility tolerance (scipy's milp does not let it be set)
BRANCH_DEPTH = 2  # layers branched on before a node too large for the table goes to HiGHS
TABLE_CELLS = 20_000_000  # the dynamic program's size limit (layers left free x byte steps): about 50 ms, 20 MB
RELATIVE = 1e-9  # damage differences below this share of the best allocation's are ties


@dataclass(frozen=True)
class Option:
    """One way to store a layer: its precision, its bytes and the damage it is predicted to do."""

    precision: LayerPrecision
    bytes: int
    damage: float


Allocation = dict[str, Option]


def allocate(options: dict[str, list[Option]], budget_bytes: int) -> Allocation:
    """The option of every layer that minimizes the summed damage with the summed bytes within the budget."""
    names = list(options)
    if not names or any(not options[n] for n in names):
        raise ValueError("every layer needs at least one option")
    smallest = sum(min(o.bytes for o in options[n]) for n in names)
    if smallest > budget_bytes:
        raise UserError(f"no allocation fits {budget_bytes:,} bytes: the smallest option of every layer adds up to "
                        f"{smallest:,} bytes")
    best = _branch({n: list(options[n]) for n in names}, budget_bytes, None, 0)
    assert best is not None  # (the smallest options fit, and the relaxation's allocation is at least that)
    return {n: best[n] for n in names}


def damage(allocation: Allocation) -> float:
    return sum(o.damage for o in allocation.values())


def _hull(options: list[Option]) -> list[Option]:
    """A layer's options on the lower convex hull of (bytes, damage), by bytes: each upgrade saves less damage per
    byte than the one before."""
    hull: list[Option] = []
    for option in sorted(options, key=lambda o: (o.bytes, o.damage)):
        if hull and (option.damage >= hull[-1].damage or option.bytes == hull[-1].bytes):
            continue  # dominated: no fewer bytes, no less damage
        while len(hull) >= 2 and ((hull[-1].damage - hull[-2].damage) * (option.bytes - hull[-2].bytes)
                                  >= (option.damage - hull[-2].damage) * (hull[-1].bytes - hull[-2].bytes)):
            hull.pop()  # on or above the segment from the one before to this one
        hull.append(option)
    return hull


@dataclass
class _Relaxation:
    price: float  # λ, damage per byte
    bound: float  # L(λ): no allocation within the budget does less damage
    least: dict[str, float]  # each layer's least damage + λ·bytes
    rounded: Allocation  # the upgrades that fit: an allocation within the budget
    split: str | None  # the layer whose upgrade did not fit (None: every layer got its least damage)


def _relax(options: dict[str, list[Option]], budget: int) -> _Relaxation | None:
    """The Lagrangian relaxation at the linear relaxation's price (None: even the smallest options do not fit)."""
    hulls = {n: _hull(options[n]) for n in options}
    left = budget - sum(h[0].bytes for h in hulls.values())
    if left < 0:
        return None
    upgrades = sorted(((h[k - 1].damage - h[k].damage) / (h[k].bytes - h[k - 1].bytes), n, k)
                      for n, h in hulls.items() for k in range(1, len(h)))
    level, price, split = dict.fromkeys(hulls, 0), 0.0, None
    for per_byte, name, k in reversed(upgrades):  # best damage per byte first
        extra = hulls[name][k].bytes - hulls[name][k - 1].bytes
        if level[name] == k - 1 and extra <= left:
            left -= extra
            level[name] = k
        elif split is None:
            price, split = per_byte, name
    least = {n: min(o.damage + price * o.bytes for o in options[n]) for n in options}
    return _Relaxation(price, sum(least.values()) - price * budget, least,
                       {n: hulls[n][level[n]] for n in hulls}, split)


def _branch(options: dict[str, list[Option]], budget: int, best: Allocation | None, depth: int) -> Allocation | None:
    """The best allocation within the budget that does less damage than `best` (or `best`)."""
    relaxed = _relax(options, budget)
    if relaxed is None:
        return best
    if best is None or damage(relaxed.rounded) < damage(best):
        best = relaxed.rounded
    ceiling = damage(best)
    tie = RELATIVE * abs(ceiling)
    floor = max(relaxed.bound, sum(min(o.damage for o in options[n]) for n in options))
    if relaxed.split is None or floor >= ceiling - tie:
        return best  # nothing within the budget does less damage
    price = relaxed.price
    options = {n: [o for o in options[n] if relaxed.bound + o.damage + price * o.bytes - relaxed.least[n] <= ceiling + tie]
               for n in options}
    if any(not kept for kept in options.values()):
        return best  # (in a branch: no allocation of it does less damage than one found in another)
    if _table_cells(options, budget) <= TABLE_CELLS:
        found = by_table(options, budget)
    elif depth < BRANCH_DEPTH and len(options[relaxed.split]) > 1:
        children = [{**options, relaxed.split: [o]} for o in options[relaxed.split]]
        bounds = [_relax(child, budget) for child in children]
        for child, bound in sorted(((c, b) for c, b in zip(children, bounds, strict=True) if b is not None),
                                   key=lambda cb: cb[1].bound):
            if bound.bound < damage(best) - tie:
                best = _branch(child, budget, best, depth + 1)
        return best
    else:
        found = solve_exactly(options, budget, scale=max(abs(ceiling), 1e-300))
    return found if found is not None and damage(found) < ceiling else best


def _spare_steps(options: dict[str, list[Option]], budget: int) -> tuple[int, int]:
    """The byte step (the largest count dividing every difference between two options of one layer) and how many
    steps the budget leaves beyond every layer's smallest option (negative: those do not fit)."""
    step = 0
    for kept in options.values():
        for option in kept:
            step = math.gcd(step, option.bytes - kept[0].bytes)
    step = step or 1
    return step, (budget - sum(min(o.bytes for o in kept) for kept in options.values())) // step


def _table_cells(options: dict[str, list[Option]], budget: int) -> float:
    """The dynamic program's size: layers left free x byte steps to spend (inf: more options than it indexes)."""
    free = [kept for kept in options.values() if len(kept) > 1]
    if any(len(kept) > 255 for kept in free):
        return math.inf
    return len(free) * (_spare_steps(options, budget)[1] + 1)


def by_table(options: dict[str, list[Option]], budget: int) -> Allocation | None:
    """The exact optimum by dynamic programming over the bytes the layers left free may spend beyond their smallest
    options, counted in steps of their common divisor (24 bytes on the default model): table[s] is the least damage
    of the layers so far within s steps. Used where layers x steps is at most TABLE_CELLS. None: even the
    smallest options do not fit."""
    step, spare = _spare_steps(options, budget)
    if spare < 0:
        return None
    free = [n for n in options if len(options[n]) > 1]
    smallest = {n: min(o.bytes for o in options[n]) for n in free}
    table = np.zeros(spare + 1)
    choices = np.zeros((len(free), spare + 1), dtype=np.uint8)
    for row, name in enumerate(free):
        after = np.full(spare + 1, np.inf)
        for index, option in enumerate(options[name]):
            extra = (option.bytes - smallest[name]) // step
            if extra > spare:
                continue
            candidate = table[: spare + 1 - extra] + option.damage
            better = candidate < after[extra:]
            np.copyto(after[extra:], candidate, where=better)
            np.copyto(choices[row, extra:], index, where=better)
        table = after
    chosen, left = {n: options[n][0] for n in options if len(options[n]) == 1}, spare
    for row in reversed(range(len(free))):
        name = free[row]
        option = options[name][choices[row, left]]
        chosen[name] = option
        left -= (option.bytes - smallest[name]) // step
    return {n: chosen[n] for n in options}


def solve_exactly(options: dict[str, list[Option]], budget_bytes: int, scale: float = 1.0) -> Allocation:
    """The same problem as a 0/1 integer program for HiGHS: one binary per (layer, option), one equality per layer,
    one budget row. Damage is divided by `scale` (the best allocation known) so that HiGHS's absolute gap of 1e-6
    is a relative one."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(options)
    flat = [(i, o) for i, n in enumerate(names) for o in options[n]]
    cost = np.array([o.damage for _, o in flat], dtype=float) / scale
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
        with c_output_silenced((1, 2)):  # HiGHS writes debugging lines to descriptors 1 and 2 on some problems
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
