"""A plan applied inside the teacher's own tensors and undone afterwards: how a search trial avoids a second teacher.

``compression.apply(share=True)`` already shares every tensor a plan leaves alone, but
the layers it compresses still get new float32 tensors: for a plan that quantizes every
layer that is a second copy of the model (543 MB of SmolLM2-135M's 538 MB), and a
sweep's peak memory would be the teacher twice plus the runtime. Here the compressed
weights are written into the teacher's tensors and, when the trial is done, the
teacher's own values are read back from ``Originals``: a safetensors file of the
teacher's parameters as loaded (exact, in their own dtype), written once per model
into the cache folder, atomically, and read straight into the teacher's tensors.

The teacher is wrong between the two steps, so ``applied`` restores it however the
block ends (an error, Ctrl-C); a process killed inside it loses only its own copy.
Layers a structured cut reshaped, and students, are new tensors anyway and are not
touched here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmtailor import files


class Originals:
    """The teacher's parameters as loaded, in a file; ``restore`` writes them back into the teacher's tensors."""

    def __init__(self, teacher: Any, folder: Path, fingerprint: str) -> None:
        self.teacher = teacher
        self.path = Path(folder) / f"{fingerprint}.safetensors"
        self.names = {id(p): name for name, p in teacher.named_parameters()}  # (a tied weight: one name)
        if not self._readable():
            from safetensors.torch import save_file

            tensors = {name: p.detach().cpu().contiguous() for name, p in teacher.named_parameters()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            files.write_with(self.path, lambda staging: save_file(tensors, staging))
        self._offsets = _tensor_offsets(self.path)

    def _readable(self) -> bool:
        try:
            offsets = _tensor_offsets(self.path)
        except (OSError, ValueError):  # missing, or damaged by a killed writer: write it again
            return False
        return set(offsets) == set(self.names.values())

    def owns(self, parameter: torch.nn.Parameter) -> bool:
        """Whether the parameter is one of the teacher's own."""
        return id(parameter) in self.names and self.teacher.get_parameter(self.names[id(parameter)]) is parameter

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter]) -> None:
        """Write the teacher's values back into these parameters of the teacher, read from the file straight into
        their memory (not mapped: a mapped file's pages would count in the process's resident memory)."""
        with open(self.path, "rb", buffering=0) as f:
            for parameter in parameters:
                begin, end = self._offsets[self.names[id(parameter)]]
                on_cpu = parameter.data if parameter.device.type == "cpu" else torch.empty_like(parameter, device="cpu")
                target = memoryview(on_cpu.view(-1).view(torch.uint8).numpy())
                f.seek(begin)
                if f.readinto(target) != end - begin:
                    raise OSError(f"{self.path} ends inside {self.names[id(parameter)]}")
                if on_cpu is not parameter.data:
                    parameter.data.copy_(on_cpu)


def _tensor_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file: an 8-byte header length, a JSON header, the data."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        size = f.seek(0, 2)
    start = 8 + length
    offsets = {name: (start + info["data_offsets"][0], start + info["data_offsets"][1])
               for name, info in header.items() if name != "__metadata__"}
    if any(end > size for _, end in offsets.values()):
        raise ValueError(f"{path} is shorter than its header says")
    return offsets


@contextlib.contextmanager
def applied(plan: Any, teacher: Any, arch: Any, originals: Originals, **apply_args: Any) -> Iterator[Any]:
    """The compressed model, made by writing into the teacher's tensors where it shares them; the teacher is
    restored on leaving the block. ``apply_args``: what ``compression.apply`` takes after the architecture."""
    from llmtailor import compression

    written: list[torch.nn.Parameter] = []
    try:
        yield compression.apply(plan, teacher, arch, share=True, in_place=(originals.owns, written), **apply_args)
    finally:
        originals.restore(written)
