"""A plan applied inside the teacher's own tensors and undone afterwards: how a search trial avoids a second teacher.

``compression.apply(share=True)`` already shares every tensor a plan leaves alone, but
the layers it compresses still get new float32 tensors: for a plan that quantizes every
layer that is a second copy of the model (543 MB of SmolLM2-135M's 538 MB), and a
sweep's peak memory would be the teacher twice plus the runtime. Here the compressed
weights are written into the teacher's tensors and, when the trial is done, the
teacher's own values are read back from ``Originals``: a safetensors file of the
teacher's parameters as loaded (exact, in their own dtype), read straight into the
teacher's tensors. Where the model's own safetensors files hold every parameter
byte for byte as loaded (a converted GGUF, a float32 model folder), those files are
read and nothing is written: a second copy would cost the model's size in disk (a
7B model's 28 GB) for nothing. Otherwise (another dtype on disk, renamed keys, a hub
id) the copy is written once per model into the cache folder, atomically. A model
file that changes after it was checked is refused at restore, not read.

The teacher is wrong between the two steps, so ``applied`` restores it however the
block ends (an error, Ctrl-C); a process killed inside it loses only its own copy.
A structured cut and a distilled student live there too: a cut weight is written into
the front of the teacher tensor it was cut from, a kept student's weights and LoRA's
merge into the tensors they replace (``compression.Writes``), so a trial with a student
holds no second copy of its weights either. The teacher's targets for training a student
are made before its tensors change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmtailor import files
from llmtailor.errors import UserError


class TeacherChanged(UserError):
    """The file the teacher's weights are restored from changed: this process's teacher is lost, so a sweep stops."""


class Originals:
    """The teacher's parameters as loaded, in a file; ``restore`` writes them back into the teacher's tensors.

    ``sources``: the safetensors files the teacher was loaded from, read instead of a copy where they match."""

    def __init__(self, teacher: Any, folder: Path, fingerprint: str, sources: tuple[Path, ...] = ()) -> None:
        self.teacher = teacher
        self.names = {id(p): name for name, p in teacher.named_parameters()}  # (a tied weight: one name)
        # name -> (file, begin, end); each file's (size, mtime) when checked, so a file changed since is refused
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._checked: dict[Path, tuple[int, int]] = {}
        if not self._found_in(sources):
            self.path = Path(folder) / f"{fingerprint}.safetensors"
            if not self._readable():
                from safetensors.torch import save_file

                tensors = {name: p.detach().cpu().contiguous() for name, p in teacher.named_parameters()}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                files.write_with(self.path, lambda staging: save_file(tensors, staging))
            self._where = {name: (self.path, *span) for name, span in _tensor_offsets(self.path).items()}
            self._checked = {self.path: _stamp(self.path)}

    def _readable(self) -> bool:
        try:
            offsets = _tensor_offsets(self.path)
        except (OSError, ValueError):  # missing, or damaged by a killed writer: write it again
            return False
        return set(offsets) == set(self.names.values())

    @torch.no_grad()
    def _found_in(self, sources: tuple[Path, ...]) -> bool:
        """Whether the model's own files hold every parameter exactly as loaded (then ``path`` is the first)."""
        found: dict[str, tuple[Path, int, int]] = {}
        for source in sources:
            try:
                found.update({name: (Path(source), *span) for name, span in _tensor_offsets(Path(source)).items()})
            except (OSError, ValueError):
                return False
        wanted = dict(self.teacher.named_parameters())
        if not set(wanted) <= set(found):
            return False
        with contextlib.ExitStack() as stack:  # one read of the model: the bytes, not only dtype and shape
            opened = {path: stack.enter_context(open(path, "rb", buffering=0)) for path, _, _ in found.values()}
            for name, parameter in wanted.items():
                path, begin, end = found[name]
                on_cpu = parameter.detach().cpu().contiguous().view(-1).view(torch.uint8)
                if end - begin != on_cpu.numel():
                    return False
                opened[path].seek(begin)
                if opened[path].read(end - begin) != memoryview(on_cpu.numpy()):
                    return False
        self._where = {name: found[name] for name in wanted}
        self._checked = {path: _stamp(path) for path, _, _ in self._where.values()}
        self.path = next(iter(self._checked))
        return True

    def owns(self, parameter: torch.nn.Parameter) -> bool:
        """Whether the parameter is one of the teacher's own."""
        return id(parameter) in self.names and self.teacher.get_parameter(self.names[id(parameter)]) is parameter

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter]) -> None:
        """Write the teacher's values back into these parameters of the teacher, read from the file straight into
        their memory (not mapped: a mapped file's pages would count in the process's resident memory)."""
        opened: dict[Path, Any] = {}
        try:
            for parameter in {id(p): p for p in parameters}.values():  # (one written twice is read once)
                path, begin, end = self._where[self.names[id(parameter)]]
                if path not in opened:
                    try:
                        opened[path] = open(path, "rb", buffering=0)
                        unchanged = _stamp(path) == self._checked[path]
                    except OSError:  # removed (`llmtailor cache --clear` beside a sweep)
                        unchanged = False
                    if not unchanged:
                        raise TeacherChanged(f"{path} changed or was removed while a search read the teacher's weights "
                                             "from it, so the teacher in memory can no longer be restored: the sweep "
                                             "stopped; run the same command again (trials measured so far are kept)")
                on_cpu = parameter.data if parameter.device.type == "cpu" else torch.empty_like(parameter, device="cpu")
                _read_into(on_cpu, opened[path], begin, end, f"{path} ends inside {self.names[id(parameter)]}")
                if on_cpu is not parameter.data:
                    parameter.data.copy_(on_cpu)
        finally:
            for f in opened.values():
                f.close()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Each tensor of a safetensors file (an 8-byte header length, a JSON header, the data): its dtype name, shape,
    and where its bytes begin and end in the file."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        size = f.seek(0, 2)
    start = 8 + length
    entries = {name: (info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0], start + info["data_offsets"][1])
               for name, info in header.items() if name != "__metadata__"}
    if any(end > size for *_, end in entries.values()):
        raise ValueError(f"{path} is shorter than its header says")
    return entries


def _tensor_offsets(path: Path) -> dict[str, tuple[int, int]]:
    return {name: (begin, end) for name, (_, _, begin, end) in _header(path).items()}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class UnmappedTensors:
    """A safetensors file's tensors, read one at a time with plain reads. A memory-mapped file's pages count in
    the process's resident memory once touched, until it is closed: reading a kept student (400 MB) through a map
    raised a search trial's peak by about that much."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries = _header(self.path)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding the stored one."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in _DTYPES:
            raise ValueError(f"{self.path}: {name} is {dtype}, which this reader does not know")
        out = torch.empty(shape, dtype=_DTYPES[dtype])
        with open(self.path, "rb", buffering=0) as f:
            _read_into(out, f, begin, end, f"{self.path} ends inside {name}")
        return out


def _read_into(tensor: torch.Tensor, f: Any, begin: int, end: int, short: str) -> None:
    """Read the file's bytes [begin, end) straight into a contiguous CPU tensor's memory; OSError(short) if the file
    ends first."""
    f.seek(begin)
    if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
        raise OSError(short)


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
