"""The joint space: precision, pruning and a distilled student sampled together in one trial.

A trial samples, each axis only where the space's ``Choices`` offer more than one value:
- **precision**, GPTQ: ``direct`` samples the bits of each group of layers (attention or
  MLP in each third of the depth, the embedding, one group size), as the ``direct``
  space does; ``guided`` samples one weight budget that the allocator spends per layer
  on the measured layer sensitivities (``spaces.guided``);
- **a structured cut** (``plan.student``, applied by ``compression.structure``): the
  share of decoder blocks removed (which ones by block influence), of KV groups removed
  (whole groups, so grouped-query attention stays intact) and of MLP channels removed
  (widths stay multiples of 8, so 4:8 still divides them). Cuts are uniform over the
  kept blocks, as a standard config needs (``Student.uniform_cut``);
- **pruning** of every linear layer of the decoder blocks: a pattern (dense,
  unstructured, 2:4 or 4:8), for unstructured a global ratio and whether OWL spreads it
  over the blocks by their outlier shares (``compression.outliers``), and the method,
  Wanda or SparseGPT (a layer whose input width M does not divide stays dense under
  N:M). Magnitude pruning is not offered: at 50% it leaves the default model at
  perplexity 249 against Wanda's 28 (BENCHMARKS.md, bench_pruning.py);
- **distillation** of a cut student (only when the cut removes something: the teacher
  is its own best copy) for a step budget, KD to the teacher's top-64 at T=2, training
  rank-``DISTILL_LORA_RANK`` adapters of the block linears at peak learning rate
  ``DISTILL_LEARNING_RATE`` (measured in bench_distill.py). Adapters, not every weight:
  the student's frozen weights are then the teacher's own wherever the cut leaves them
  whole and AdamW keeps moments for the adapters only, which keeps training a student
  within 3x the float32 teacher's memory (2.9x; full-weight training 6.2x, before this
  recipe 8x: bench_distill_memory.py); trained students are kept by ``compression.trained``, and
  the search's fidelity levels train a quarter of a budget first (``search.study``). A space may
  offer rank 0, every weight trained at ``DISTILL_FULL_LEARNING_RATE`` (``distill_lora_ranks``):
  better for depth cuts at 40 steps (KL 0.543 against LoRA's 0.608; LoRA better for an MLP cut,
  0.231 against 0.255: bench_distill.py), for a GPU, whose memory training uses instead of the
  process's, or a machine with the memory to spare (a student that does not fit is refused).

Layers pruned by SparseGPT and quantized by GPTQ are solved jointly in input order, so
they get ``act_order=False``. Which blocks a depth cut keeps and how OWL spreads a ratio
depend on the model: the space is bound to its measured ``BlockScores`` (``with_blocks``)
before sampling, and a guided space to its sensitivities (``with_sensitivity``);
unbound, a cut keeps the first blocks and ratios are uniform, which gives the same bytes
(blocks are the same size), so ``smallest`` needs no measurement.

The named presets (``PRESETS``) narrow the choices: ``quant`` (precision only),
``prune`` (no distillation), ``distill`` (no pruning) and ``joint`` (everything). A
user's YAML names a preset to start from and replaces any choice (``load_choices``);
an unknown key or a value the space cannot use is a one-line error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtailor import arch as arch_mod
from llmtailor.arch import Architecture
from llmtailor.compression import outliers, structure
from llmtailor.errors import UserError
from llmtailor.evaluators.cost import weight_bytes
from llmtailor.plan import CompressionPlan, Distillation, LayerSparsity, Student, nm_pair, nm_ratio
from llmtailor.spaces.base import BlockScores, SearchSpace
from llmtailor.spaces.grouped import GroupedSpace, _without_identities, by_depth_segment, by_part
from llmtailor.spaces.guided import GuidedSpace

WIDTH_MULTIPLE = 8
DISTILL_LEARNING_RATE = 1e-3  # adapters train at a higher rate than whole weights
DISTILL_LORA_RANK = 16
DISTILL_FULL_LEARNING_RATE = 2e-4  # every weight, rank 0 (bench_distill.py's KD recipe)
PATTERNS = ("dense", "unstructured", "2:4", "4:8")
METHODS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class Choices:
    """The values each axis of a joint space may take (one value: the axis is fixed, not sampled)."""

    precision: str = "direct"  # direct | guided
    bits: tuple[int, ...] = (16, 8, 4)  # direct precision: per group of layers
    group_sizes: tuple[int, ...] = (128, 32, 0)  # direct precision; 0: one group per output row
    prune_patterns: tuple[str, ...] = PATTERNS
    prune_ratios: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)  # unstructured
    prune_methods: tuple[str, ...] = METHODS
    owl: tuple[bool, ...] = (True, False)
    cut_blocks: tuple[float, ...] = (0.0, 0.1, 0.2)  # share of decoder blocks removed
    cut_heads: tuple[float, ...] = (0.0, 0.33)  # share of KV groups removed
    cut_mlp: tuple[float, ...] = (0.0, 0.125, 0.25)  # share of MLP channels removed
    distill_steps: tuple[int, ...] = (0, 40, 160)  # KD steps of a cut student
    distill_lora_ranks: tuple[int, ...] = (DISTILL_LORA_RANK,)  # 0: train every weight (memory: see above)

    LATER_FIELDS = ("distill_lora_ranks",)  # fields added after studies stored their choices (no annotation: not a field)

    def __post_init__(self) -> None:
        def check(name: str, ok: Any, what: str) -> None:
            values = getattr(self, name)
            if not values or not all(ok(v) for v in values) or len(set(values)) != len(values):
                raise UserError(f"space choice {name}: {list(values)} must be distinct {what}, at least one")

        if self.precision not in ("direct", "guided"):
            raise UserError(f"space choice precision: {self.precision!r} must be direct or guided")
        check("bits", lambda v: isinstance(v, int) and v in (2, 3, 4, 8, 16), "bit widths of 2, 3, 4, 8 or 16")
        check("group_sizes", lambda v: isinstance(v, int) and v >= 0, "group sizes >= 0 (0: per row)")
        check("prune_patterns", lambda v: v in PATTERNS, f"patterns of {', '.join(PATTERNS)}")
        check("prune_ratios", lambda v: isinstance(v, int | float) and 0 < v < 1, "ratios in (0, 1)")
        check("prune_methods", lambda v: v in METHODS, f"methods of {', '.join(METHODS)}")
        check("owl", lambda v: isinstance(v, bool), "true/false")
        for name in ("cut_blocks", "cut_heads", "cut_mlp"):
            check(name, lambda v: isinstance(v, int | float) and 0 <= v < 1, "shares in [0, 1)")
        check("distill_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "step counts >= 0")
        check("distill_lora_ranks", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "adapter ranks >= 0 (0: every weight)")

    @property
    def cuts(self) -> bool:
        return any(max(getattr(self, n)) > 0 for n in ("cut_blocks", "cut_heads", "cut_mlp"))

    @property
    def prunes(self) -> bool:
        return self.prune_patterns != ("dense",)

    def to_dict(self) -> dict[str, Any]:
        """The choices as JSON; a later field at its default is left out, so studies stored before it resume."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in self.LATER_FIELDS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if k not in defaults or defaults[k] != v}


NO_CUT = {"cut_blocks": (0.0,), "cut_heads": (0.0,), "cut_mlp": (0.0,), "distill_steps": (0,)}
PRESETS = {
    "quant": Choices(prune_patterns=("dense",), **NO_CUT),
    "prune": Choices(distill_steps=(0,)),
    "distill": Choices(prune_patterns=("dense",)),
    "joint": Choices(),
}


def load_choices(path: str | Path) -> tuple[str, Choices]:
    """A user's space from YAML: ``preset`` (default joint) and any choices it replaces; (name, choices)."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the space file {file}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"space file {file}: expected a mapping of choices, got {type(data).__name__}")
    preset = data.pop("preset", "joint")
    if preset not in PRESETS:
        raise UserError(f"space file {file}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(Choices)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"space file {file}: unknown key(s) {', '.join(unknown)}; known: preset, {', '.join(sorted(known))}")
    values = {k: v if k == "precision" else tuple(v) if isinstance(v, list) else (v,) for k, v in data.items()}
    return f"{preset}+{file.stem}", dataclasses.replace(PRESETS[preset], **values)


class JointSpace(SearchSpace):
    """Precision (direct or guided GPTQ), a structured cut with its distillation, and Wanda or SparseGPT pruning."""

    calibrated = True

    def __init__(self, name: str, choices: Choices, scores: BlockScores | None = None, sensitivity: Any = None) -> None:
        self.name, self.choices, self.scores, self.sensitivity = name, choices, scores, sensitivity
        self.needs_blocks = choices.cuts or choices.prunes
        self.needs_sensitivity = choices.precision == "guided"
        self.distills = choices.cuts and max(choices.distill_steps) > 0
        self.direct = GroupedSpace("direct", by_depth_segment(3), by_part, method="gptq", bits=choices.bits,
                                   group_sizes=choices.group_sizes)
        self.guided = GuidedSpace(sensitivity)

    def with_blocks(self, scores: BlockScores) -> JointSpace:
        return JointSpace(self.name, self.choices, scores, self.sensitivity)

    def with_sensitivity(self, sensitivity: Any) -> JointSpace:
        return JointSpace(self.name, self.choices, self.scores, sensitivity) if self.needs_sensitivity else self

    # What search.sensitivity measures for a guided space: the guided space's layers, options and anchor.
    layers = staticmethod(GuidedSpace.layers)
    options = staticmethod(GuidedSpace.options)
    anchor = staticmethod(GuidedSpace.anchor)

    def sample(self, trial: Any, arch: Architecture) -> CompressionPlan:
        c = self.choices
        if c.precision == "guided":
            params = {"weight_budget": trial.suggest_float("weight_budget", 0.0, 1.0)}
        else:
            params = self.direct.sample_precision(trial, arch)

        def pick(name: str, values: tuple) -> Any:
            return trial.suggest_categorical(name, values) if len(values) > 1 else values[0]

        for name in ("cut_blocks", "cut_heads", "cut_mlp"):
            params[name] = pick(name, getattr(c, name))
        if params["cut_blocks"] or params["cut_heads"] or params["cut_mlp"]:
            params["distill_steps"] = pick("distill_steps", c.distill_steps)
            if params["distill_steps"]:
                params["distill_lora_rank"] = pick("distill_lora_rank", c.distill_lora_ranks)
        params["prune_pattern"] = pick("prune_pattern", c.prune_patterns)
        if params["prune_pattern"] != "dense":
            params["prune_method"] = pick("prune_method", c.prune_methods)
        if params["prune_pattern"] == "unstructured":
            params["prune_ratio"] = pick("prune_ratio", c.prune_ratios)
            params["owl"] = pick("owl", c.owl)
        return self.plan(params, arch)

    def precision(self, params: dict[str, Any], arch: Architecture) -> dict:
        if "weight_budget" in params:
            return dict(self.guided.plan(params, arch).precision)
        return self.direct.precision(params, arch)

    def plan(self, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        return self._assemble(self.precision(params, arch), params, arch)

    def _assemble(self, precision: dict, params: dict[str, Any], arch: Architecture) -> CompressionPlan:
        """The plan of these structure and pruning parameters on top of every layer's precision."""
        student = self.student(params, arch)
        small = arch_mod.cut(arch, *student.uniform_cut(arch.num_layers))  # teacher names, the cut's widths
        precision = {lin.name: precision[lin.name] for lin in (*small.linears, arch.embedding) if lin.name in precision}
        pattern, sparsity = params.get("prune_pattern", "dense"), {}
        ratios = self.block_ratios(params, list(range(arch.num_layers) if student.layers is None else student.layers))
        for lin in small.linears:
            if lin.block is None or not ratios:
                continue
            if pattern == "unstructured" or lin.in_features % nm_pair(pattern)[1] == 0:
                sparsity[lin.name] = LayerSparsity(ratios[lin.block], pattern, params["prune_method"])
                if sparsity[lin.name].method == "sparsegpt" and precision.get(lin.name) and precision[lin.name].method == "gptq":
                    precision[lin.name] = dataclasses.replace(precision[lin.name], act_order=False)
        return dataclasses.replace(_without_identities(precision, sparsity), student=student)

    def student(self, params: dict[str, Any], arch: Architecture) -> Student:
        """The structured cut (blocks kept by influence, once bound; query heads and MLP width per kept block) and,
        when it removes something, its distillation."""
        removed = min(round(params.get("cut_blocks", 0.0) * arch.num_layers), arch.num_layers - 1)
        layers = None
        if removed:
            influence = self.scores.influence if self.scores else [float(-b) for b in range(arch.num_layers)]
            layers = structure.blocks_to_keep(list(influence), arch.num_layers - removed)
        kept = range(arch.num_layers) if layers is None else layers
        per_group = arch.num_heads // arch.num_kv_heads
        groups = arch.num_kv_heads - min(round(params.get("cut_heads", 0.0) * arch.num_kv_heads), arch.num_kv_heads - 1)
        width = arch.intermediate_size
        if params.get("cut_mlp", 0.0):
            width = max(WIDTH_MULTIPLE, int(width * (1 - params["cut_mlp"])) // WIDTH_MULTIPLE * WIDTH_MULTIPLE)
        heads = {b: groups * per_group for b in kept} if groups < arch.num_kv_heads else {}
        mlp_width = {b: width for b in kept} if width < arch.intermediate_size else {}
        steps = params.get("distill_steps", 0)
        if not (layers is not None or heads or mlp_width):
            steps = 0  # a share too small to remove a block, head group or channel of this model cuts nothing
        rank = params.get("distill_lora_rank", self.choices.distill_lora_ranks[0])
        recipe = (Distillation(steps=steps, learning_rate=DISTILL_LEARNING_RATE if rank else DISTILL_FULL_LEARNING_RATE,
                               lora_rank=rank) if steps else Distillation())
        return Student(layers=layers, heads=heads, mlp_width=mlp_width, distillation=recipe)

    def block_ratios(self, params: dict[str, Any], kept: list[int]) -> dict[int, float]:
        """Each kept block's pruning ratio (empty when dense): the pattern's, or the global ratio, spread by OWL
        over the kept blocks (so their mean is the asked ratio)."""
        pattern = params.get("prune_pattern", "dense")
        if pattern == "dense":
            return {}
        if pattern != "unstructured":
            return dict.fromkeys(kept, nm_ratio(pattern))
        ratio = params["prune_ratio"]
        if not params["owl"] or self.scores is None:
            return dict.fromkeys(kept, ratio)
        spread = outliers.layer_ratios({b: self.scores.outlier_shares[b] for b in kept}, ratio)
        return {b: round(r, 4) for b, r in spread.items()}

    def smallest(self, arch: Architecture) -> CompressionPlan:
        c = self.choices
        params: dict[str, Any] = {"cut_blocks": max(c.cut_blocks), "cut_heads": max(c.cut_heads),
                                  "cut_mlp": max(c.cut_mlp), "prune_pattern": "dense"}
        if "unstructured" in c.prune_patterns:
            params.update(prune_pattern="unstructured", prune_ratio=max(c.prune_ratios), owl=False,
                          prune_method=c.prune_methods[0])
        elif c.prunes:  # N:M: 4:8 and 2:4 keep the same share
            params.update(prune_pattern=[p for p in c.prune_patterns if p != "dense"][0], prune_method=c.prune_methods[0])
        if c.precision == "guided":  # the allocator's smallest options, needing no sensitivities
            return self._assemble(dict(self.guided.smallest(arch).precision), params, arch)
        candidates = [self.plan({**self.direct.uniform_precision(arch, min(c.bits), g), **params}, arch)
                      for g in c.group_sizes]
        return min(candidates, key=lambda p: weight_bytes(p, arch))

    def baselines(self, arch: Architecture) -> list[dict[str, Any]]:
        """The uniform plans this space can express, tried first: dense; 8-bit and 4-bit g128 GPTQ; 50%
        SparseGPT (Wanda where the space offers only Wanda); 2:4 likewise; a 20% depth cut (undistilled, and
        distilled at the largest budget); 4-bit with 50% pruning."""
        c = self.choices
        method = "sparsegpt" if "sparsegpt" in c.prune_methods else c.prune_methods[0]
        uncut = {"cut_blocks": 0.0, "cut_heads": 0.0, "cut_mlp": 0.0, "prune_pattern": "dense"}
        half = {"prune_pattern": "unstructured", "prune_ratio": 0.5, "owl": False, "prune_method": method}
        depth = {**uncut, "cut_blocks": 0.2}
        wanted = [((16, 128, 16), uncut), ((8, 0, 8), uncut), ((4, 128, 8), uncut), ((16, 128, 16), {**uncut, **half}),
                  ((16, 128, 16), {**uncut, "prune_pattern": "2:4", "prune_method": method}),
                  ((16, 128, 16), {**depth, "distill_steps": 0}),
                  ((16, 128, 16), {**depth, "distill_steps": max(c.distill_steps)}),
                  ((4, 128, 8), {**uncut, **half})]
        baselines = []
        for (bits, group, embed), structure_params in wanted:
            params = {**self._uniform(arch, bits, group, embed), **structure_params}
            if params not in baselines and self._expressible(params):
                baselines.append(params)
        return baselines

    def _uniform(self, arch: Architecture, bits: int, group: int, embed: int) -> dict[str, Any]:
        if self.choices.precision == "guided":
            share = 1.0 if bits == 16 else self.guided.budget_share(arch, self.guided.uniform_bytes(arch, bits, group,
                                                                                                     embed))
            return {"weight_budget": share}
        return self.direct.uniform_precision(arch, bits, group, embed)

    def _expressible(self, params: dict[str, Any]) -> bool:
        """Whether every value of a baseline is among the choices (Optuna cannot enqueue one outside them)."""
        c = self.choices
        allowed = {"group_size": c.group_sizes, "embed_bits": c.bits, "cut_blocks": c.cut_blocks,
                   "cut_heads": c.cut_heads, "cut_mlp": c.cut_mlp, "distill_steps": c.distill_steps,
                   "prune_pattern": c.prune_patterns, "prune_method": c.prune_methods, "prune_ratio": c.prune_ratios,
                   "owl": c.owl, "distill_lora_rank": c.distill_lora_ranks}
        for key, value in params.items():
            values = c.bits if key.startswith("bits_") else allowed.get(key)
            if values is not None and value not in values:
                return False
        return not (params.get("distill_steps") and not params.get("cut_blocks"))
