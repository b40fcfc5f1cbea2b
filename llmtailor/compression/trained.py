"""Trained students: a distilled student is trained once and kept, for every trial and process that needs it.

Distillation is the dear step of a plan (minutes to hours where a quantization takes
seconds), and many plans share a student: the same structured cut and recipe under
different precisions and sparsities. A trained student is therefore keyed by what
determines its weights and nothing else: the teacher, the training text (the
calibration windows, whose key also fixes the importance that chose the cut), the
student's structure, the distillation recipe, for quantization-aware training the
precision each layer learns (bits and group; a QAT run trains on the RTN grid whatever
method quantizes it afterwards), the seed and the batch size. Precision and sparsity
are applied to the trained student afterwards, as to any cut model.

Each entry is a folder with ``training.json`` (steps, seconds and loss curve) and the
student's weights in one of two forms. A LoRA student (``lora_rank`` > 0) is kept as its
adapters alone, ``adapters.safetensors`` (A and B of every decoder-block linear layer): the
rest of it is the cut of the teacher it started from, which the key fixes, so loading cuts
the teacher as for any plan and merges the adapters as training did
(``distill.merge_adapters``). At rank 16 that is 17 MB for the default model with its MLP
cut by a quarter instead of 459 MB of float32 weights (26x less: an n x m layer keeps
r(n + m) numbers instead of nm, so larger models save more), and a kept student loads in
0.38 s instead of 0.58 s (bench_student_store.py). A full-weight student, every weight
trained, is a folder that ``save_pretrained`` wrote, so it reloads as a plain Hugging Face
model (``AutoModelForCausalLM.from_pretrained``); so were LoRA students kept before
adapters were (they still load). Entries are written to a temporary folder and renamed
into place; a process that finds the folder already there (another worker finished first)
keeps the one there. An entry that does not load is deleted and trained again.

The teacher's targets (``distill.TeacherTargets``) are made lazily per (temperature,
top k, hidden states) from the calibration windows cut into ``WINDOW_TOKENS`` pieces
(more, shorter sequences per step: the measured recipe of ``bench_distill.py``), and
cached by ``distill.load_or_compute_targets``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtailor import files
from llmtailor.arch import Architecture
from llmtailor.compression import distill
from llmtailor.hw_profiles import host
from llmtailor.plan import CompressionPlan, Distillation, LayerPrecision, PlanError

WINDOW_TOKENS = 128
BATCH_SIZE = 4
ADAPTERS = "adapters.safetensors"  # a LoRA student's entry: its adapters, merged into the cut when loaded
# On a CPU a step's windows go through the student one at a time, their gradients summed (the same step): the
# activations of 4 windows at once left holes in glibc's heap that kept a sweep 400 MB above what it held, and
# one at a time keeps training a student within 3x the float32 teacher (bench_distill_memory.py), at 34% more
# seconds per step (4.7 s against 3.5 s). On a GPU activations are not in the process's memory: the whole batch.
CPU_WINDOWS_PER_PASS = 1
# On a CPU, a training step's freed activations (a window's blocks of 300-800 KB, many per block and pass) leave
# holes in glibc's heap that later blocks of other sizes do not fit, so a step's peak grows over a run, and a sweep's
# trials that trained a 160-step student peaked at 3.0x the float32 teacher (seventeenth session). While a student
# trains, blocks from 256 KB on get their own mappings, returned when freed, and each step ends with malloc_trim.
# bench_distill_memory.py, MLP cut by 25%, 40 steps: peak 1,573 MB before, 1,436 MB now (2.92x -> 2.67x), at 28%
# more seconds per step (4.0 -> 5.1 s: each such block is mapped and faulted in afresh); from 512 KB on: 1,557 MB at
# 4.4 s. BENCHMARKS.md, "Training's heap". A GPU's activations are not in this heap: nothing changes there.
CPU_TRAINING_MAPPED_BYTES = 256 << 10


@contextlib.contextmanager
def heap_kept_small(device: str | torch.device) -> Iterator[Callable[[], None]]:
    """While a student trains on a CPU, glibc maps blocks from CPU_TRAINING_MAPPED_BYTES on; yields what to call
    after each step (give back what the step freed). On a GPU nothing changes and the call does nothing."""
    if torch.device(device).type != "cpu":
        yield lambda: None
        return
    with host.blocks_mapped_from(CPU_TRAINING_MAPPED_BYTES):
        yield host.release_freed_memory


@dataclass
class Record:
    """How a trained student was made: steps, seconds of training, its loss curve, and whether this call trained
    it (False: it came from the cache, and ``seconds`` is what training it took when it was made)."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    trained_now: bool = False


def qat_grid(plan: CompressionPlan, arch: Architecture, chosen: Any = None) -> tuple[dict, dict]:
    """The grid each quantized layer of a kept block learns in quantization-aware training (RTN's, at the plan's
    bits and group), by teacher layer name and by the cut model's module name; empty unless the recipe asks for
    QAT."""
    if not plan.student.distillation.qat:
        return {}, {}
    kept = plan.student.layers
    by_teacher, by_module = {}, {}
    for lin in arch.linears:
        precision = plan.precision_of(lin.name)
        if lin.block is None or precision.bits >= 16 or (kept is not None and lin.block not in kept):
            continue
        by_teacher[lin.name] = LayerPrecision(precision.bits, precision.group_size)
        by_module[lin.name if chosen is None else chosen.module_name(lin.name, arch)] = by_teacher[lin.name]
    return by_teacher, by_module


class TrainedStudents:
    """Distilled students of one teacher on one training text, trained on demand and kept in ``folder``."""

    def __init__(self, teacher: Any, windows: Callable[[], torch.Tensor], text_key: str, cache: Path | None,
                 device: str | torch.device = "cpu", seed: int = 0, progress: bool = False) -> None:
        """`windows` makes the training windows (called once, when targets are first needed); `text_key` names
        the teacher and those windows (a calibration key digests both); `cache` is the cache folder (students
        in ``students/``, targets in ``teacher/``), None to keep nothing on disk."""
        self.teacher, self.windows, self.text_key, self.cache = teacher, windows, text_key, cache
        self.folder = None if cache is None else cache / "students"
        self.device, self.seed, self.progress = device, seed, progress
        self._targets: dict[tuple[float, int, bool], distill.TeacherTargets] = {}
        self.last: Record | None = None  # how the student of the latest `trained` call was made

    def key(self, plan: CompressionPlan, arch: Architecture) -> str:
        """The cache key of the plan's trained student (see the module docstring for what it holds)."""
        student = plan.student
        qat, _ = qat_grid(plan, arch)
        described = {"text": self.text_key, "window_tokens": WINDOW_TOKENS,
                     "layers": student.layers, "heads": sorted(student.heads.items()),
                     "mlp_width": sorted(student.mlp_width.items()), "recipe": student.distillation.to_dict(),
                     "qat": sorted((name, p.bits, p.group_size) for name, p in qat.items()), "seed": self.seed,
                     "batch": BATCH_SIZE}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]

    def has(self, plan: CompressionPlan, arch: Architecture) -> bool:
        """Whether the plan's student is already trained and kept."""
        return self.folder is not None and (self.folder / self.key(plan, arch) / "training.json").is_file()

    def targets(self, recipe: Distillation) -> distill.TeacherTargets:
        """The teacher's targets for this recipe, made once per (temperature, k, hidden states)."""
        wanted = _wanted(recipe)
        if wanted not in self._targets:
            windows = self.windows()
            if windows.shape[1] % WINDOW_TOKENS:
                raise PlanError(f"the training windows ({windows.shape[1]} tokens) must be a multiple of "
                                f"{WINDOW_TOKENS} tokens long")
            pieces = windows.reshape(-1, WINDOW_TOKENS)
            key = f"{self.text_key}-w{WINDOW_TOKENS}"
            if self.cache is None:
                made = distill.teacher_targets(self.teacher, pieces, *wanted[:2], self.device, hidden=wanted[2])
            else:
                made = distill.load_or_compute_targets(self.teacher, pieces, *wanted[:2], key, self.cache,
                                                       self.device, hidden=wanted[2])
            self._targets[wanted] = made
        return self._targets[wanted]

    def trained(self, plan: CompressionPlan, cut_model: Any, arch: Architecture, chosen: Any = None,
                writable: Callable[[torch.nn.Parameter], bool] | None = None, teacher_intact: bool = True) -> Any:
        """The plan's student: `cut_model` (the teacher cut by `chosen`, a ``structure.Cut``, or an uncut copy)
        trained in place now, or given the kept student's weights in place when the cache holds it. A kept tensor
        equal to the one `cut_model` holds is not replaced, so a cut that shares the teacher's tensors keeps
        sharing what training left alone (the embeddings and norms under LoRA) and never holds a second copy.
        ``writable``: which of `cut_model`'s tensors a kept student's weights or LoRA's merge may be written into
        (default none: new tensors). ``teacher_intact=False``: the teacher's tensors already hold the cut, so its
        targets cannot be made now; a student that must be trained then needs them made before (``targets``)."""
        recipe = plan.student.distillation
        qat, qat_modules = qat_grid(plan, arch, chosen)
        if recipe.qat and not qat:
            raise PlanError("quantization-aware training needs quantized layers: give some layer bits < 16, "
                            "or set qat to false")
        key = self.key(plan, arch)
        if self._load(key, cut_model, writable):
            return cut_model
        if not teacher_intact and _wanted(recipe) not in self._targets:  # a kept entry that failed to load
            raise PlanError(f"the kept student {key} did not load and was deleted, and the teacher's targets to train "
                            "it again cannot be made while this trial changes the teacher: measure the plan again")
        per_pass = CPU_WINDOWS_PER_PASS if torch.device(self.device).type == "cpu" else None
        self._check_memory(cut_model, recipe, per_pass or BATCH_SIZE, writable)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=recipe.steps, desc="distillation", unit="step", leave=False)

        try:
            with heap_kept_small(self.device) as after_step:

                def progress(step: int, loss: float) -> None:
                    after_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}")

                run = distill.distill(cut_model, self.targets(recipe), recipe, device=self.device, seed=self.seed,
                                      batch_size=BATCH_SIZE, progress=progress, qat_precision=qat_modules or None,
                                      windows_per_pass=per_pass, merge_into=writable)
        finally:
            if bar is not None:
                bar.close()
        self.last = Record(run.steps, run.seconds, run.losses, trained_now=True)
        self._store(key, cut_model, run.adapters)
        host.release_freed_memory()  # training's gradients and optimizer moments, freed, would stay resident
        return cut_model

    def _check_memory(self, student: Any, recipe: Distillation, windows_per_pass: int,
                      writable: Callable[[torch.nn.Parameter], bool] | None) -> None:
        """Refuse, with the figures, a training run whose predicted peak (``distill.training_bytes``) exceeds the
        memory available to it (the OS's for a CPU, the GPU's free memory on CUDA): a process the OS kills for
        memory leaves no reason behind, and a sweep would retry its trial in vain."""
        shared = {p.data_ptr() for p in self.teacher.parameters()}
        # LoRA merges in place where it may write: no new tensor for those (asking records a teacher's weight for
        # restoring, as the merge into it will)
        if writable is not None:
            shared = {m.weight.data_ptr() for m in distill.block_linears(student)
                      if m.weight.data_ptr() in shared and not writable(m.weight)}
        need = distill.training_bytes(student, recipe, windows_per_pass * WINDOW_TOKENS, shared)
        device = torch.device(self.device)
        if device.type == "cuda":
            free, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
        else:
            free, where = host.available_memory_bytes(), "available"
        if need > free:
            raise distill.NotEnoughMemory(
                f"training this student needs about {need / 1e6:,.0f} MB more memory and {free / 1e6:,.0f} MB is "
                f"{where}: free memory (fewer workers), or choose a smaller cut or no distillation")

    def _load(self, key: str, skeleton: Any, writable: Callable[[torch.nn.Parameter], bool] | None = None) -> bool:
        """Whether the student under `key` is kept; if so, its weights are now `skeleton`'s (tensor by tensor, so
        a kept student never exists beside its skeleton). An entry that does not match the skeleton's names and
        shapes is deleted (trained again); one that breaks while its tensors are read is deleted too, and the
        error raised, since the skeleton is then half filled."""
        if self.folder is None:
            return False
        path = self.folder / key
        if not (path / "training.json").is_file():
            return False
        from llmtailor.compression.originals import UnmappedTensors

        adapters = path / ADAPTERS
        lora = adapters.is_file()  # kept as adapters (else whole: a full-weight student, or one kept before)
        try:
            record = json.loads((path / "training.json").read_text())
            if lora:
                kept = _read_adapters(adapters, skeleton)
            else:
                readers = [UnmappedTensors(f) for f in sorted(path.glob("*.safetensors"))]
                stored = {name: reader for reader in readers for name in reader.keys()}
                _check_matches(skeleton, stored)
        except Exception:  # a damaged or foreign entry: train it again
            shutil.rmtree(path, ignore_errors=True)
            return False
        try:
            if lora:
                distill.merge_adapters(skeleton, kept, writable)
                skeleton.eval().requires_grad_(False)
            else:
                _fill(skeleton, stored, writable)
        except Exception:
            shutil.rmtree(path, ignore_errors=True)
            raise
        host.release_freed_memory()  # tensors read and freed (or replaced, outside a search) would stay in glibc's heap
        self.last = Record(record["steps"], record["seconds"], record["losses"])
        return True

    def _store(self, key: str, model: Any, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the student under `key`: its LoRA `adapters` where it has them, else the whole model."""
        if self.folder is None or self.last is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{key}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            if adapters:
                from safetensors.torch import save_file

                staging.mkdir()
                save_file({f"{name}.{part}": tensor.contiguous().cpu() for name, pair in adapters.items()
                           for part, tensor in zip("ab", pair, strict=True)}, str(staging / ADAPTERS))
            else:
                model.save_pretrained(staging)
            (staging / "training.json").write_text(json.dumps(
                {"steps": self.last.steps, "seconds": self.last.seconds, "losses": self.last.losses}))
            files.usual_modes(staging)  # the weights were written 0600: the folder is shared with other workers
            os.rename(staging, self.folder / key)
        except OSError:  # another process kept the same student first: theirs stays
            if not (self.folder / key / "training.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _read_adapters(path: Path, skeleton: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The kept adapters, checked against `skeleton` (the cut they were trained on): one (A, B) for every
    decoder-block linear layer, A of r x inputs and B of outputs x r; ValueError otherwise."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layers = distill.named_block_linears(skeleton)
    if set(tensors) != {f"{name}.{part}" for name in layers for part in "ab"}:
        raise ValueError("the kept adapters are not those of the cut's layers")
    adapters = {name: (tensors[f"{name}.a"], tensors[f"{name}.b"]) for name in layers}
    for name, (a, b) in adapters.items():
        out, width = layers[name].weight.shape
        if a.shape[0] < 1 or a.shape != (a.shape[0], width) or b.shape != (out, a.shape[0]):
            raise ValueError(f"the kept adapter of {name} is {tuple(a.shape)}, {tuple(b.shape)} for a "
                             f"{out} x {width} layer")
    return adapters


def _wanted(recipe: Distillation) -> tuple[float, int, bool]:
    """What a recipe's teacher targets are made for: (temperature, top k, hidden states)."""
    return recipe.temperature, recipe.top_k, bool(recipe.hidden_weight)


def _parameter_names(model: Any) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def _check_matches(skeleton: Any, stored: dict[str, Any]) -> None:
    """Raise ValueError unless every parameter of `skeleton` (a tied pair by either name) is stored, shaped alike."""
    for names in _parameter_names(skeleton).values():
        name = next((n for n in names if n in stored), None)
        if name is None:
            raise ValueError(f"the kept student has no {names[0]}")
        shape = stored[name].shape(name)
        if shape != tuple(skeleton.get_parameter(name).shape):
            raise ValueError(f"the kept student's {name} is {shape}, the cut's {tuple(skeleton.get_parameter(name).shape)}")


@torch.no_grad()
def _fill(skeleton: Any, stored: dict[str, Any], writable: Callable[[torch.nn.Parameter], bool] | None = None) -> None:
    """Give `skeleton` the stored tensors, one at a time: the skeleton's own parameter (perhaps the teacher's) where
    the stored one is equal, written into it where ``writable`` accepts it, else a new parameter; a tied pair stays
    one parameter."""
    from llmtailor.compression import repoint_parameters

    names = _parameter_names(skeleton)

    def filled(parameter: torch.nn.Parameter) -> torch.nn.Parameter:
        name = next(n for n in names[id(parameter)] if n in stored)
        tensor = stored[name].tensor(name).to(parameter.dtype).to(parameter.device)
        if torch.equal(tensor, parameter):
            return parameter
        if writable is not None and writable(parameter):
            parameter.data.copy_(tensor)
            return parameter
        return torch.nn.Parameter(tensor, requires_grad=False)

    repoint_parameters(skeleton, filled)
    skeleton.eval().requires_grad_(False)
