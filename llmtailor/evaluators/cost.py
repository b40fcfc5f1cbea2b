"""Cost of a plan on a device, from the plan and the architecture alone (no weights).

Bytes are exact: they are the bytes of the packed form that
``llmtailor.compression.pack`` produces, and a test holds the two equal.

The workload's ``dense_dtype`` is the width a runtime keeps unquantized tensors in
(weights, norms, KV cache, activations): float16/bfloat16 (2 bytes, the stored form
and what llama.cpp and GPU runtimes run) or float32 (what PyTorch eager loads on a
CPU unless told otherwise). The packed file is always float16; only what the device
holds and reads changes with it.

Storage rules (one layer, weight matrix of ``out`` rows by ``in`` inputs):
- 16 bits: float16 values, nothing else.
- b < 16 bits: b-bit codes, bit-packed; one float16 scale per group of ``group_size``
  consecutive inputs of a row (0 means one group per row); when ``in`` is not a
  multiple of the group size the last group of each row is shorter, and it still has
  its own scale. Asymmetric quantization adds one b-bit integer zero point per group,
  bit-packed.
- Sparse layers store whichever of three forms is smallest: dense codes (zeros
  included), a bitmask of kept positions plus the kept codes, or CSR (kept codes, a
  column index each, int16 when ``in`` <= 65536, and an int32 row pointer per row + 1).
  N:M layers store the kept codes plus a ceil(log2 M)-bit position per kept value.
- Pruning keeps ``in - floor(ratio * in)`` weights per row for unstructured sparsity,
  ``in / M * N`` for N:M: magnitude and Wanda keep exactly that many in every row;
  unstructured SparseGPT keeps that many per row on average (out times it in all),
  and every sparse form above depends on the total alone, so its bytes are exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llmtailor.arch import Architecture, Linear, cut
from llmtailor.hw_profiles import DeviceProfile, roofline
from llmtailor.hw_profiles.roofline import Operation
from llmtailor.plan import CompressionPlan, LayerPrecision, LayerSparsity, Student

FLOAT16_BYTES = 2
INT32_BYTES = 4
DENSE_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}  # bytes per value


@dataclass(frozen=True)
class Workload:
    """How the model is used on the device: context kept, batch, prompt length, and unquantized width."""

    context_length: int = 2048
    batch_size: int = 1
    prompt_length: int = 512
    dense_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"dense dtype must be one of {sorted(DENSE_DTYPES)}, got {self.dense_dtype!r}")

    @property
    def dense_bytes(self) -> int:
        return DENSE_DTYPES[self.dense_dtype]


@dataclass(frozen=True)
class TensorBytes:
    """Bytes of one stored weight matrix, by component."""

    format: str  # dense | bitmask | csr | n:m
    values: int
    scales: int
    zeros: int
    index: int

    @property
    def total(self) -> int:
        return self.values + self.scales + self.zeros + self.index


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row: the last one is shorter when in_features is not a multiple of group_size."""
    return 1 if group_size == 0 or group_size >= in_features else math.ceil(in_features / group_size)


def kept_per_row(in_features: int, sparsity: LayerSparsity) -> int:
    """How many weights of each row a pruner keeps."""
    if sparsity.pattern == "unstructured":
        return in_features - math.floor(sparsity.ratio * in_features)
    n, m = sparsity.nm
    return in_features // m * n


def _packed(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def tensor_bytes(out_features: int, in_features: int, precision: LayerPrecision, sparsity: LayerSparsity,
                 dense_bytes: int = FLOAT16_BYTES) -> TensorBytes:
    """Bytes of one weight matrix stored at this precision and sparsity (16-bit values held `dense_bytes` wide)."""
    bits = precision.bits if precision.bits < 16 else 8 * dense_bytes
    scales = zeros = 0
    if bits < 16:
        groups = out_features * num_groups(in_features, precision.group_size)
        scales = groups * FLOAT16_BYTES
        zeros = 0 if precision.symmetric else _packed(groups, bits)
    dense_values = _packed(out_features * in_features, bits)
    if sparsity.is_identity:
        return TensorBytes("dense", dense_values, scales, zeros, 0)
    kept = out_features * kept_per_row(in_features, sparsity)
    kept_values = _packed(kept, bits)
    if sparsity.pattern != "unstructured":
        m = sparsity.nm[1]
        return TensorBytes("n:m", kept_values, scales, zeros, _packed(kept, math.ceil(math.log2(m))))
    index_bytes = 2 if in_features <= 65536 else 4
    options = [
        TensorBytes("dense", dense_values, scales, zeros, 0),
        TensorBytes("bitmask", kept_values, scales, zeros, _packed(out_features * in_features, 1)),
        TensorBytes("csr", kept_values, scales, zeros, kept * index_bytes + (out_features + 1) * INT32_BYTES),
    ]
    return min(options, key=lambda t: t.total)


def structured(plan: CompressionPlan, arch: Architecture) -> tuple[CompressionPlan, Architecture]:
    """The plan's structured cut applied to the architecture: (the plan without its cut, the smaller architecture).
    Every public function here prices the cut this way, so bytes, FLOPs and the KV cache all shrink with it."""
    layers, heads, width = plan.student.uniform_cut(arch.num_layers)
    if layers is None and heads is None and width is None:
        return plan, arch
    return replace(plan, student=Student(distillation=plan.student.distillation)), cut(arch, layers, heads, width)


def stored_layers(arch: Architecture) -> list[Linear]:
    """Every weight matrix a plan can set the precision of: the linears and the embedding."""
    return [*arch.linears, arch.embedding]


def layer_bytes(plan: CompressionPlan, lin: Linear, dense_bytes: int = FLOAT16_BYTES) -> TensorBytes:
    """Bytes of one layer of the model under the plan."""
    return tensor_bytes(lin.out_features, lin.in_features, plan.precision_of(lin.name), plan.sparsity_of(lin.name),
                        dense_bytes)


def weight_bytes(plan: CompressionPlan, arch: Architecture) -> int:
    """Bytes of every stored weight matrix under the plan."""
    plan, arch = structured(plan, arch)
    return sum(layer_bytes(plan, lin).total for lin in stored_layers(arch))


def bits_per_weight(plan: CompressionPlan, arch: Architecture) -> float:
    """Average stored bits per weight, scales, zero points and sparse indices included."""
    plan, arch = structured(plan, arch)
    return 8 * weight_bytes(plan, arch) / sum(lin.params for lin in stored_layers(arch))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the model needs on the device, by component."""

    weights: int  # linear layers (an untied lm_head included)
    embedding: int
    other: int  # norms and biases, at the dense width
    kv_cache: int
    activations: int
    overhead: int  # the runtime itself, from the device profile

    @property
    def total(self) -> int:
        return self.weights + self.embedding + self.other + self.kv_cache + self.activations + self.overhead


def kv_cache_bytes(plan: CompressionPlan, arch: Architecture, workload: Workload) -> int:
    """KV cache at the workload's context length and batch (quantized caches add a scale per head and token)."""
    plan, arch = structured(plan, arch)
    vectors = 2 * arch.num_layers * arch.num_kv_heads * workload.context_length * workload.batch_size
    if plan.kv_cache_bits >= 16:
        return vectors * arch.head_dim * workload.dense_bytes
    return _packed(vectors * arch.head_dim, plan.kv_cache_bits) + vectors * FLOAT16_BYTES


def activation_bytes(arch: Architecture, workload: Workload, head_copy: int = 0) -> int:
    """Peak working buffers of one block during prefill at the dense width, plus the last token's logits in float32,
    plus `head_copy`: the bytes of a dense copy of the output head some runtimes make for the prompt's last position
    (``_prompt_head_copy_bytes``)."""
    tokens = workload.batch_size * workload.prompt_length
    hidden_buffers = tokens * (4 * arch.hidden_size + 2 * arch.intermediate_size) * workload.dense_bytes
    scores = workload.batch_size * arch.num_heads * workload.prompt_length**2 * workload.dense_bytes
    logits = workload.batch_size * arch.vocab_size * 4
    return hidden_buffers + scores + logits + head_copy


def _head(arch: Architecture) -> Linear | None:
    """The layer that computes the logits: the embedding matrix where the two are tied."""
    if arch.tie_embeddings:
        return Linear(arch.embedding.name, arch.hidden_size, arch.vocab_size, None, "lm_head")
    return next((lin for lin in arch.linears if lin.kind == "lm_head"), None)


def _prompt_head_copy_bytes(plan: CompressionPlan, arch: Architecture, profile: DeviceProfile,
                            workload: Workload) -> int:
    """The dense copy of the head a runtime makes to multiply a prompt's last position, where its profile prices one
    (``prompt_head_read_gbps``: PyTorch's CPU half-precision matmul, 57 MB on the default model in bfloat16)."""
    head = _head(arch)
    if head is None or plan.precision_of(head.name).bits < 16:
        return 0
    precision = roofline.compute_precision(profile, False, workload.dense_dtype)
    if profile.prompt_head_gbps(precision, head.out_features, head.in_features) is None:
        return 0
    return head.params * workload.dense_bytes


def _weight_copies(plan: CompressionPlan, lin: Linear, profile: DeviceProfile | None) -> float:
    """Copies of this layer's weights the runtime holds at its peak (``weight_copies_at_load`` of its kernel)."""
    kernel = _kernel(plan.precision_of(lin.name), profile) if profile is not None else None
    return profile.weight_copies_at_load.get(kernel, 1.0) if kernel else 1.0


def memory(plan: CompressionPlan, arch: Architecture, workload: Workload,
           profile: DeviceProfile | None = None) -> MemoryEstimate:
    """Memory the plan needs: weights, embedding, other parameters, KV cache, activations, runtime. With a device
    profile, what its runtime holds beyond the stored form: its own memory, weights a kernel holds twice while they
    load, a copy of the head during prefill."""
    plan, arch = structured(plan, arch)
    weights = sum(math.ceil(layer_bytes(plan, lin, workload.dense_bytes).total * _weight_copies(plan, lin, profile))
                  for lin in arch.linears)
    head_copy = _prompt_head_copy_bytes(plan, arch, profile, workload) if profile is not None else 0
    return MemoryEstimate(
        weights=weights,
        embedding=layer_bytes(plan, arch.embedding, workload.dense_bytes).total,
        other=arch.other_params * workload.dense_bytes,
        kv_cache=kv_cache_bytes(plan, arch, workload),
        activations=activation_bytes(arch, workload, head_copy),
        overhead=profile.runtime_overhead_bytes if profile is not None else 0,
    )


@dataclass(frozen=True)
class LatencyEstimate:
    """Predicted time to first token (prefill of the prompt) and time per generated token."""

    prefill_s: float
    decode_s_per_token: float
    energy_j_per_token: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token


def _kernel(precision: LayerPrecision, profile: DeviceProfile) -> str | None:
    """The device's kernel that multiplies by this layer's low-bit weights directly, or None (dense, or no kernel)."""
    if precision.bits >= 16:
        return None
    if precision.act_bits == 8 and precision.bits == 8 and "int8_activations" in profile.kernels:
        return "int8_activations"
    weight_only = "int8_weight_only" if precision.bits == 8 else "int4_weight_only"
    return weight_only if weight_only in profile.kernels else None


def weight_only_key(precision: LayerPrecision, rates: dict[str, float]) -> str:
    """The key of a low-bit layer's fused weight-only kernel in a profile's rates: its width ("int8", "int4"), or
    with zero points "int4_zero_point" where the profile gives that format rates of its own."""
    width = "int8" if precision.bits == 8 else "int4"
    return f"{width}_zero_point" if not precision.symmetric and f"{width}_zero_point" in rates else width


def _has_kernel(precision: LayerPrecision, profile: DeviceProfile) -> bool:
    """Whether the device multiplies by this layer's low-bit weights directly (a fused kernel)."""
    return _kernel(precision, profile) is not None


def _linear_operations(plan: CompressionPlan, lin: Linear, profile: DeviceProfile, tokens: int,
                       workload: Workload, prompt_head: bool = False) -> list[Operation]:
    """A matmul of `tokens` rows through one layer, with the bytes the device really reads for it.

    Without a sparse kernel the runtime multiplies the dense form. Without a fused low-bit
    kernel it first expands the weights to the dense width, once per forward pass: it reads
    the codes and scales and writes the dense copy (about two operations per weight), and
    the matmul then reads that copy. So a weight-only format saves memory but not time there.
    A fused weight-only kernel computes and reads at its own rates where the profile gives them.
    `prompt_head`: this is the head over a prompt's last position, which some runtimes read
    at a rate of its own when it is dense (the profile's ``prompt_head_read_gbps``).
    """
    precision, sparsity = plan.precision_of(lin.name), plan.sparsity_of(lin.name)
    dense = workload.dense_bytes
    compute = roofline.compute_precision(profile, precision.act_bits == 8 and _has_kernel(precision, profile),
                                         workload.dense_dtype)
    kept_share = 1.0
    if not sparsity.is_identity:
        kernel = "sparse_unstructured" if sparsity.pattern == "unstructured" else f"sparse_{sparsity.pattern.replace(':', '_')}"
        if kernel in profile.kernels:
            kept_share = kept_per_row(lin.in_features, sparsity) / lin.in_features
        else:
            sparsity = LayerSparsity()
    operations, kernel_tflops, read_gbps = [], None, None
    if precision.bits < 16 and not _has_kernel(precision, profile):
        stored = tensor_bytes(lin.out_features, lin.in_features, precision, sparsity, dense).total
        operations.append(Operation(2.0 * lin.params, stored + lin.params * dense, compute))
        precision = LayerPrecision()
    elif precision.bits < 16 and compute != "int8":  # a fused weight-only kernel
        kernel_tflops = profile.weight_only_tflops.get(weight_only_key(precision, profile.weight_only_tflops))
        reads = profile.weight_only_bandwidth_efficiency
        read_key = weight_only_key(precision, reads)
        if read_key in reads:
            read_gbps = profile.memory_bandwidth_gbps * reads[read_key]
    if prompt_head and precision.bits >= 16:
        read_gbps = profile.prompt_head_gbps(compute, lin.out_features, lin.in_features)
    read = tensor_bytes(lin.out_features, lin.in_features, precision, sparsity, dense).total
    operations.append(Operation(2.0 * tokens * lin.params * kept_share, read, compute, kernel_tflops, read_gbps))
    return operations


def latency(plan: CompressionPlan, arch: Architecture, profile: DeviceProfile, workload: Workload) -> LatencyEstimate:
    """Roofline prediction of prefill and per-token decode time, and decode energy per token.

    Per phase, each layer's matmul takes max(bytes / bandwidth, FLOPs / compute) with the
    profile's efficiencies; attention adds its FLOPs (prefill, causal) or its KV-cache reads
    (decode, at the context length); each block adds the profile's fixed overhead, and prefill
    the profile's time per value of elementwise work over the prompt's activations, and layers with int8
    activations their per-call quantizing of inputs and outputs.
    """
    plan, arch = structured(plan, arch)
    batch, prompt, context = workload.batch_size, workload.prompt_length, workload.context_length
    linears = list(arch.linears)
    if arch.tie_embeddings:  # the head reads the embedding matrix, at the embedding's precision
        linears.append(_head(arch))
    kv_per_block = kv_cache_bytes(plan, arch, workload) / arch.num_layers
    attention_width = arch.num_heads * arch.head_dim
    fp = roofline.compute_precision(profile, False, workload.dense_dtype)

    def operations(tokens: int) -> list[Operation]:
        # The head runs on the last position only: generation needs no logits for the rest of the prompt.
        return [op for lin in linears
                for op in _linear_operations(plan, lin, profile, batch * (tokens if lin.kind != "lm_head" else 1),
                                             workload, prompt_head=lin.kind == "lm_head" and tokens > 1)]

    prefill = operations(prompt)
    prefill += [Operation(4.0 * batch * attention_width * prompt * (prompt + 1) / 2, 0.0, fp)] * arch.num_layers
    decode = operations(1)
    decode += [Operation(4.0 * batch * attention_width * context, kv_per_block, fp)] * arch.num_layers

    # Elementwise work over the prompt's activations (norms, activation function, residual adds), where measured.
    values = arch.num_layers * batch * prompt * (arch.hidden_size + arch.intermediate_size)
    # Layers run by int8_activations quantize their input and dequantize their output on every call.
    int8_values = sum(lin.in_features + lin.out_features for lin in arch.linears
                      if _kernel(plan.precision_of(lin.name), profile) == "int8_activations") * batch
    int8_ns = profile.int8_activation_ns_per_value * 1e-9
    prefill_s = roofline.total_seconds(prefill, profile, arch.num_layers) + \
        values * profile.prefill_ns_per_value.get(fp, 0.0) * 1e-9 + int8_values * prompt * int8_ns
    decode_s = roofline.total_seconds(decode, profile, arch.num_layers) + int8_values * int8_ns
    return LatencyEstimate(prefill_s, decode_s, decode_s * profile.power_watts)


@dataclass(frozen=True)
class CostEstimate:
    """Everything the cost model predicts for one plan on one device."""

    memory: MemoryEstimate
    latency: LatencyEstimate
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget_bytes


def estimate(plan: CompressionPlan, arch: Architecture, profile: DeviceProfile, workload: Workload) -> CostEstimate:
    """Memory, latency and energy of a plan on a device, and whether it fits the device's budget."""
    return CostEstimate(
        memory(plan, arch, workload, profile),
        latency(plan, arch, profile, workload),
        profile.usable_memory_bytes,
    )
