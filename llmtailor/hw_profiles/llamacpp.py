"""llama.cpp, the second runtime: GGUF files as plans, their speed measured, and a host profile fitted for it.

llama.cpp is how small models are deployed on CPUs (the default model's Q4_1 file
decodes here about five times faster than PyTorch float32), so the cost model must
predict it too. Everything here needs the optional ``llama-cpp-python`` package
(``pip install llama-cpp-python``, built with the README's CMAKE_ARGS on
CPUs whose AVX-512/AMX builds crash); nothing in the default install imports it.

- ``plan_of`` reads a GGUF file's tensor types into the plan the cost model prices
  (Q8_0 is 8 bits in symmetric groups of 32, Q4_0 4 bits symmetric, Q4_1 4 bits with a
  minimum; K-quants are refused: their super-blocks are not a plan of this version).
- ``write`` copies a GGUF file keeping some blocks (a depth cut), or writes a random
  model of other shapes with the same tokenizer (for calibration), and ``quantize``
  converts a file with llama.cpp's own quantizer.
- ``measure`` times prefill and decode with llama.cpp (median of repeats).
- ``fit_profile`` fits a llama.cpp profile of this machine from measurements of a
  random model whose shapes differ from the models it is then checked on: per format
  (F16, Q8_0, Q4_0, Q4_1: Q4_1's minimum per group makes it a kernel of its own) the
  share of the probe's read bandwidth a decode step reaches and the rate a prompt's
  matmuls reach, one fixed cost per block, and a prompt's elementwise work per value.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmtailor.errors import UserError
from llmtailor.hw_profiles import DeviceProfile
from llmtailor.plan import CompressionPlan, LayerPrecision
from llmtailor.quiet import c_output_silenced

# GGUF tensor type -> the precision the cost model prices; F16/F32 are dense (the workload's dense dtype).
PRECISIONS = {"Q8_0": LayerPrecision(8, 32, symmetric=True), "Q4_0": LayerPrecision(4, 32, symmetric=True),
              "Q4_1": LayerPrecision(4, 32)}
DENSE = {"F16": "float16", "F32": "float32"}
FORMATS = ("F16", "Q8_0", "Q4_0", "Q4_1")  # what `quantize` makes and `plan_of` reads
# Random models to calibrate on: two widths (a prompt's elementwise work shows beside its matmuls) and two depths far
# apart (the cost per block shows beside the bytes); each converted to every format.
CALIBRATION = [dict(hidden=768, intermediate=2048, heads=12, kv_heads=4, blocks=6),
               dict(hidden=768, intermediate=2048, heads=12, kv_heads=4, blocks=24),
               dict(hidden=384, intermediate=1024, heads=6, kv_heads=2, blocks=6),
               dict(hidden=384, intermediate=1024, heads=6, kv_heads=2, blocks=24)]
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama.cpp measurements need the optional llama-cpp-python package: pip install "
                        "llama-cpp-python (it compiles for minutes; where its default build crashes on generation, "
                        "build it with the CMAKE_ARGS of llmtailor's README, section Device profiles)") from None
    return llama_cpp


def architecture(path: Path) -> Any:
    """The architecture in a GGUF file's header (no tensor is read)."""
    from transformers import AutoConfig

    from llmtailor import arch

    return arch.from_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))


def plan_of(path: Path, arch: Any) -> tuple[CompressionPlan, str]:
    """The plan a GGUF file's weight types are, and the dense dtype of its unquantized weights."""
    from gguf import GGUFReader

    precision, dense = {}, set()
    for tensor in GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] in LINEARS:
            name = f"model.layers.{parts[1]}.{LINEARS[parts[2]]}"
        elif tensor.name == "token_embd.weight":
            name = arch.embedding.name
        elif tensor.name == "output.weight":
            name = "lm_head"
        else:
            continue  # norms: float32 vectors in every format
        if kind in DENSE:
            dense.add(DENSE[kind])
        elif kind in PRECISIONS:
            precision[name] = PRECISIONS[kind]
        else:
            raise UserError(f"{path.name}: tensor {tensor.name} is {kind}; the cost model prices "
                            f"{', '.join(FORMATS)} (K-quants' super-blocks are not a plan of this version)")
    if len(dense) > 1:
        raise UserError(f"{path.name} mixes float16 and float32 weights; the cost model takes one dense width")
    return CompressionPlan(precision=precision), dense.pop() if dense else "float16"


def write(source: Path, target: Path, *, blocks: int | None = None, shapes: dict[str, int] | None = None,
          seed: int = 0) -> Path:
    """Copy a llama GGUF file keeping its first ``blocks`` blocks, or (``shapes``: hidden, intermediate, heads,
    kv_heads, blocks) write a model of those shapes with random float32 weights and the source's tokenizer."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch_name = reader.fields["general.architecture"].contents()
    kept = shapes["blocks"] if shapes else blocks
    overrides = {f"{arch_name}.block_count": kept}
    if shapes:
        overrides.update({f"{arch_name}.embedding_length": shapes["hidden"],
                          f"{arch_name}.feed_forward_length": shapes["intermediate"],
                          f"{arch_name}.attention.head_count": shapes["heads"],
                          f"{arch_name}.attention.head_count_kv": shapes["kv_heads"],
                          f"{arch_name}.rope.dimension_count": shapes["hidden"] // shapes["heads"],
                          "general.file_type": 0})
    writer = GGUFWriter(target, arch_name)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer writes these itself
        value = overrides.get(field.name, field.contents())
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type)
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= kept:
            continue
        if not shapes:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)  # its bytes as they are
            continue
        shape = _random_shape(tensor.name, shapes, int(tensor.shape[-1]) if tensor.name == "token_embd.weight" else 0)
        values = np.ones(shape, np.float32) if tensor.name.endswith("norm.weight") else \
            rng.standard_normal(shape, dtype=np.float32) * 0.02
        writer.add_tensor(tensor.name, values, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _random_shape(name: str, s: dict[str, int], vocab: int) -> tuple[int, ...]:
    head_dim = s["hidden"] // s["heads"]
    rows = {"token_embd": vocab, "output": vocab, "attn_q": s["hidden"], "attn_k": s["kv_heads"] * head_dim,
            "attn_v": s["kv_heads"] * head_dim, "attn_output": s["hidden"], "ffn_gate": s["intermediate"],
            "ffn_up": s["intermediate"], "ffn_down": s["hidden"]}
    kind = name.split(".")[-2]
    if kind in ("attn_norm", "ffn_norm", "output_norm"):
        return (s["hidden"],)
    return rows[kind], s["intermediate"] if kind == "ffn_down" else s["hidden"]


def quantize(source: Path, target: Path, fmt: str) -> Path:
    """llama.cpp's own quantizer: every weight, the token embedding too, in ``fmt`` (requantizing if need be)."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    llama_cpp = _llama_cpp()
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt}" if fmt != "F16" else "LLAMA_FTYPE_MOSTLY_F16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = code, 2, True
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{fmt}")
    params.token_embedding_type = params.output_tensor_type = ggml_type  # one format: a clean variant to price
    with c_output_silenced((1, 2)):  # a line per tensor
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
    if failed:
        raise UserError(f"llama.cpp could not quantize {source.name} to {fmt}")
    return target


@dataclass(frozen=True)
class Speed:
    """Median seconds of a prompt's prefill and of one decode step (at a context of prompt + half the steps)."""

    prefill_s: float
    decode_s_per_token: float
    prompt_tokens: int
    decode_tokens: int
    threads: int


def measure(path: Path, *, prompt: int = 256, decode: int = 64, repeats: int = 3, threads: int = 2) -> Speed:
    """Time llama.cpp on a GGUF file: a prompt of ``prompt`` tokens in one batch, then ``decode`` single steps."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(path), n_ctx=prompt + decode + 8, n_batch=prompt, n_ubatch=prompt, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    tokens = [int(t) for t in np.random.default_rng(0).integers(100, llm.n_vocab(), prompt)]
    llm.eval(tokens[:8])  # warm: first-call allocations are not the model's speed
    prefills, decodes = [], []
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prefills.append(time.perf_counter() - started)
        started = time.perf_counter()
        for step in range(decode):
            llm.eval([tokens[step]])
        decodes.append((time.perf_counter() - started) / decode)
    llm.close()
    return Speed(statistics.median(prefills), statistics.median(decodes), prompt, decode, threads)


def workload(speed: Speed, dense_dtype: str) -> Any:
    """The cost model's workload for a measurement: its prompt, and decode at the middle of its steps."""
    from llmtailor.evaluators import cost

    return cost.Workload(context_length=speed.prompt_tokens + speed.decode_tokens // 2,
                         prompt_length=speed.prompt_tokens, dense_dtype=dense_dtype)


def base_profile(host: DeviceProfile) -> DeviceProfile:
    """The host's memory facts and probe bandwidth, with llama.cpp's kernels and every rate still to fit."""
    return replace(host, name="host-llama.cpp", description=f"{host.description}; llama.cpp rates fitted on this machine",
                   kernels=frozenset({"int8_weight_only", "int4_weight_only"}), runtime="llama.cpp (CPU)",
                   peak_tflops={"fp16": 1.0, "fp32": 1.0},
                   weight_only_tflops={"int8": 1.0, "int4": 1.0, "int4_zero_point": 1.0},
                   compute_efficiency=1.0, bandwidth_efficiency=1.0,
                   bandwidth_efficiency_by_precision={"fp16": 1.0, "fp32": 1.0},
                   weight_only_bandwidth_efficiency={"int8": 1.0, "int4": 1.0, "int4_zero_point": 1.0},
                   layer_overhead_us=0.0,
                   prefill_ns_per_value={}, prompt_head_read_gbps={}, weight_copies_at_load={},
                   int8_activation_ns_per_value=0.0)


def _format_of(plan: CompressionPlan, dense_dtype: str) -> str:
    """The one kernel a single-format file runs, as the profile's rates name it: fp16 (fp32), int8 or int4, with
    "_zero_point" for a format with a minimum per group (Q4_1)."""
    kinds = {(p.bits, p.symmetric) for p in plan.precision.values()}
    if not kinds:
        return "fp16" if dense_dtype == "float16" else "fp32"
    if len(kinds) > 1:
        raise UserError("a calibration file must hold one format")
    bits, symmetric = kinds.pop()
    return f"int{bits}" + ("" if symmetric else "_zero_point")


def fit_profile(host: DeviceProfile, runs: list[tuple[Any, CompressionPlan, str, Speed]]) -> DeviceProfile:
    """A llama.cpp profile of this machine from measured (architecture, plan, dense dtype, speed) runs.

    With every rate at 1 (``base_profile``) the cost model's decode time of a run is its bytes read over the probe
    bandwidth, and its prefill time its FLOPs at 1 TFLOPS. A decode step's measured time is, per format f, x_f times
    the first plus the blocks times a fixed cost: a least-squares fit over runs at several depths gives 1/efficiency
    per format and the cost per block. A prompt's time less that cost per block is y_f times the second (1/TFLOPS)
    plus its elementwise values times a time per value (runs at two widths separate the two). Decode must be bound by
    reading and prefill by arithmetic, as they are for llama.cpp on a CPU."""
    from llmtailor.evaluators import cost

    base = base_profile(host)
    formats = sorted({_format_of(plan, dense) for _, plan, dense, _ in runs})
    rows, decode_t, prefill_unit, prefill_t, blocks, columns, values = [], [], [], [], [], [], []
    for arch, plan, dense, speed in runs:
        unit = cost.latency(plan, arch, base, workload(speed, dense))
        column = formats.index(_format_of(plan, dense))
        cut = cost.structured(plan, arch)[1]
        blocks.append(cut.num_layers)
        rows.append([unit.decode_s_per_token if i == column else 0.0 for i in range(len(formats))] + [blocks[-1]])
        decode_t.append(speed.decode_s_per_token)
        prefill_unit.append(unit.prefill_s)
        prefill_t.append(speed.prefill_s)
        columns.append(column)
        values.append(cut.num_layers * speed.prompt_tokens * (cut.hidden_size + cut.intermediate_size))
    # Relative errors: weight each run by 1 / its time so a fast variant counts as much as a slow one.
    decode_x = _relative_lstsq(np.array(rows), np.array(decode_t))
    per_block = max(float(decode_x[-1]), 0.0)
    shares = {f: float(1 / x) for f, x in zip(formats, decode_x[:-1], strict=True)}
    # A prompt: per format 1/TFLOPS, and one time per value of elementwise work (norms, activation, rope) shared by
    # every format; runs at two widths tell them apart (the matmuls grow with the width squared, that work with it).
    prefill_rows = [[prefill_unit[k] if i == columns[k] else 0.0 for i in range(len(formats))] + [values[k] * 1e-9]
                    for k in range(len(runs))]
    prefill_x = _relative_lstsq(np.array(prefill_rows), np.array(prefill_t) - np.array(blocks) * per_block)
    rates = {f: float(1 / x) for f, x in zip(formats, prefill_x[:-1], strict=True)}
    bad = {f: v for f, v in {**{f"{k} read share": v for k, v in shares.items()},
                              **{f"{k} TFLOPS": v for k, v in rates.items()}}.items() if not 0 < v < math.inf}
    if bad:
        raise UserError(f"the llama.cpp timings do not fit the cost model ({', '.join(bad)} came out non-positive): "
                        "measure again on an otherwise idle machine")
    # A share is of the probe's read bandwidth; where llama.cpp reads faster than the probe, its fastest rate is the
    # profile's bandwidth instead (a profile's shares are at most 1).
    bandwidth = base.memory_bandwidth_gbps * max(1.0, *shares.values())
    shares = {f: share * base.memory_bandwidth_gbps / bandwidth for f, share in shares.items()}
    dense = {k: v for k, v in shares.items() if k in ("fp16", "fp32")}
    return replace(base, memory_bandwidth_gbps=bandwidth, bandwidth_efficiency_by_precision=dense,
                   bandwidth_efficiency=next(iter(dense.values()), 1.0),
                   weight_only_bandwidth_efficiency={k: v for k, v in shares.items() if k.startswith("int")},
                   # F32 files are not calibrated (llama.cpp users run F16 or quantized ones): F16's rate stands in
                   peak_tflops={"fp32": rates.get("fp32", rates.get("fp16", 1.0)),
                                **{k: v for k, v in rates.items() if k in ("fp16", "fp32")}},
                   weight_only_tflops={k: v for k, v in rates.items() if k.startswith("int")},
                   layer_overhead_us=per_block * 1e6, prefill_ns_per_value={"fp16": max(float(prefill_x[-1]), 0.0)})


def _relative_lstsq(rows: np.ndarray, times: np.ndarray) -> np.ndarray:
    solution, *_ = np.linalg.lstsq(rows / times[:, None], np.ones_like(times), rcond=None)
    return solution


def calibration_files(folder: Path, source: Path, log: Callable[[str], None] = lambda _: None,
                      ) -> dict[str, tuple[Path, Any]]:
    """The random calibration models in every format, written into ``folder`` (about 1.5 GB, half a minute): name ->
    (file, architecture; one model's architecture serves all its formats, its header parsed once)."""
    made = {}
    for i, shapes in enumerate(CALIBRATION):
        f32 = write(source, folder / f"random-{i}.f32.gguf", shapes=shapes)
        arch = architecture(f32)
        for fmt in FORMATS:
            made[f"random {shapes['hidden']} wide, {shapes['blocks']} blocks, {fmt}"] = \
                (quantize(f32, folder / f"random-{i}-{fmt}.gguf", fmt), arch)
        f32.unlink()
        log(f"wrote calibration model {i + 1} of {len(CALIBRATION)} in {len(FORMATS)} formats")
    return made


def median_speed(speeds: list[Speed]) -> Speed:
    first = speeds[0]
    return Speed(statistics.median(s.prefill_s for s in speeds), statistics.median(s.decode_s_per_token for s in speeds),
                 first.prompt_tokens, first.decode_tokens, first.threads)


def calibrate(host: DeviceProfile, source: Path, *, rounds: int = 2, log: Callable[[str], None] = lambda _: None,
              ) -> DeviceProfile:
    """This machine's llama.cpp profile: random models written, converted, measured (median over ``rounds``
    passes), and the profile fitted; the files are removed afterwards. ``source``: a llama GGUF file whose
    tokenizer the random models borrow."""
    _llama_cpp()
    with tempfile.TemporaryDirectory(prefix="llmtailor-llamacpp-") as folder:
        made = calibration_files(Path(folder), source, log)
        speeds: dict[str, list[Speed]] = {name: [] for name in made}
        for round_ in range(rounds):
            for name, (path, _) in made.items():
                speeds[name].append(measure(path))
            log(f"measured pass {round_ + 1} of {rounds}")
        runs = [(arch, *plan_of(path, arch), median_speed(speeds[name])) for name, (path, arch) in made.items()]
    from llmtailor.hw_profiles import host as host_mod

    # The runtime's own memory: a fresh process that has loaded llama.cpp's library, before any model (not the
    # PyTorch runtime the host profile measured). Its buffers beside the weights are not modelled.
    runtime = host_mod.in_a_fresh_process("from llmtailor.hw_profiles import host; import llama_cpp; "
                                           "print(host.peak_resident_bytes())")
    return replace(fit_profile(host, runs), runtime_overhead_bytes=int(runtime))


def write_profile(profile: DeviceProfile, path: Path) -> Path:
    from llmtailor import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, profile.to_yaml(
        f"This machine running llama.cpp, fitted by `llmtailor devices --calibrate --runtime llama.cpp` "
        f"({time.strftime('%Y-%m-%d %H:%M')})\non random models (hidden 768 and 384, 6 and 24 blocks) in "
        f"{', '.join(FORMATS)}: per format the share of\nthe read probe a decode step reaches and a prompt's matmul "
        "rate, a cost per block, and a prompt's elementwise ns per value."))
    return path
