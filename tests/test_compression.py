import itertools
from pathlib import Path

import pytest
import torch

from llmtailor import compression
from llmtailor.compression import compress_layer
from llmtailor.compression.packing import pack_layer
from llmtailor.compression.quantize import pack_bits, rtn, unpack_bits
from llmtailor.evaluators.cost import stored_layers, tensor_bytes
from llmtailor.plan import CompressionPlan, Distillation, LayerPrecision, LayerSparsity, PlanError, Student

SPARSITIES = [LayerSparsity(), LayerSparsity(0.5), LayerSparsity(0.9), LayerSparsity(0.5, "2:4"),
              LayerSparsity(0.75, "1:4")]


@pytest.mark.parametrize("bits, group, symmetric", [
    (b, g, s) for b, g, s in itertools.product((16, 8, 4, 3, 2), (0, 32, 128), (False, True))
    if b < 16 or (g == 0 and not s)])
def test_packed_bytes_equal_cost_model_and_unpack_exactly(bits, group, symmetric):
    torch.manual_seed(bits + group)
    weight = torch.randn(24, 200)
    precision = LayerPrecision(bits, group, symmetric)
    for sparsity in SPARSITIES:
        dense, quantized, mask = compress_layer(weight, precision, sparsity)
        packed = pack_layer(dense, quantized, mask, precision, sparsity)
        assert packed.nbytes == tensor_bytes(24, 200, precision, sparsity).total
        tolerance = 1e-3 if bits == 16 else 0.0  # 16-bit layers are stored as float16
        assert torch.allclose(packed.unpack(), dense, atol=tolerance, rtol=tolerance)


def test_bit_packing_round_trips():
    for bits in (2, 3, 4, 8):
        values = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
        packed = pack_bits(values, bits)
        assert packed.nbytes == -(-1001 * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_rtn_error_shrinks_with_bits_and_groups():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.linspace(0.1, 3, 256)  # columns of very different ranges
    error = lambda p: ((rtn(weight, p).dequantize() - weight).norm() / weight.norm()).item()  # noqa: E731
    assert error(LayerPrecision(8)) < 0.01
    assert error(LayerPrecision(8)) < error(LayerPrecision(4)) < error(LayerPrecision(3)) < error(LayerPrecision(2))
    assert error(LayerPrecision(4, 32)) < error(LayerPrecision(4, 128)) < error(LayerPrecision(4, 0))


def test_rtn_codes_stay_in_range_and_zero_is_exact():
    weight = torch.randn(8, 64)
    weight[:, :5] = 0
    for p in (LayerPrecision(4, 32), LayerPrecision(3, 0, True), LayerPrecision(2, 16)):
        q = rtn(weight, p)
        assert int(q.codes.max()) < 2**p.bits
        assert torch.all(q.dequantize()[:, :5] == 0)


def test_pruning_keeps_the_asked_share_and_pattern():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    _, _, mask = compress_layer(weight, LayerPrecision(), LayerSparsity(0.3))
    assert (mask.sum(dim=1) == 64 - int(0.3 * 64)).all()
    kept = weight.abs()[mask].min()
    assert (weight.abs()[~mask] <= kept + 1e-6).sum() > 0  # the pruned are the small ones, row by row
    for row in range(16):
        assert weight[row].abs()[~mask[row]].max() <= weight[row].abs()[mask[row]].min()
    _, _, nm = compress_layer(weight, LayerPrecision(), LayerSparsity(0.5, "2:4"))
    assert (nm.reshape(16, 16, 4).sum(dim=2) == 2).all()


def test_apply_leaves_the_teacher_alone_and_keeps_ties(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in stored_layers(tiny.arch)},
                           sparsity={tiny.arch.linears[0].name: LayerSparsity(0.5)})
    model = compression.apply(plan, tiny.model, tiny.arch)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, tiny.model.model.embed_tokens.weight)
    first = model.get_submodule(tiny.arch.linears[0].name).weight
    assert (first == 0).float().mean().item() >= 0.5


@pytest.mark.parametrize("touch_embedding", [True, False])
def test_a_sharing_apply_copies_only_what_it_changes_and_computes_the_same(tiny, touch_embedding):
    layers = stored_layers(tiny.arch) if touch_embedding else tiny.arch.linears[:3]
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in layers},
                           sparsity={tiny.arch.linears[0].name: LayerSparsity(0.5)})
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    owned = compression.apply(plan, tiny.model, tiny.arch)
    shared = compression.apply(plan, tiny.model, tiny.arch, share=True)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    teacher = dict(tiny.model.named_parameters())
    changed = {x.name + ".weight" for x in layers}
    for name, parameter in shared.named_parameters():
        assert (parameter is teacher[name]) == (name not in changed), name
    assert shared.lm_head.weight is shared.model.embed_tokens.weight
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(shared(ids).logits, owned(ids).logits)


def test_pack_of_a_model_matches_apply(tiny):
    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in tiny.arch.linears},
                           sparsity={tiny.arch.linears[1].name: LayerSparsity(0.5, "2:4")})
    model = compression.apply(plan, tiny.model, tiny.arch)
    packed = compression.pack(plan, tiny.model, tiny.arch)
    for lin in tiny.arch.linears:
        assert torch.equal(packed[lin.name].unpack(), model.get_submodule(lin.name).weight.data)


@pytest.mark.parametrize("plan, message", [
    (CompressionPlan(student=Student(layers=(0, 1))), "structured cuts choose what goes by importance"),
    (CompressionPlan(student=Student(distillation=Distillation(steps=10))), "no teacher targets were given"),
    (CompressionPlan(student=Student(hidden_size=32)), "cutting the hidden size is not supported"),
    (CompressionPlan(kv_cache_bits=8), "KV-cache"),
    (CompressionPlan(precision={"model.layers.0.mlp.up_proj": LayerPrecision(4, method="magic")}), "unknown quant"),
    (CompressionPlan(sparsity={"model.layers.0.mlp.up_proj": LayerSparsity(0.5, method="magic")}), "unknown prun"),
    (CompressionPlan(precision={"model.layers.0.mlp.up_proj": LayerPrecision(8, act_bits=8)}), "activation"),
])
def test_plans_this_version_cannot_apply_are_refused(tiny, plan, message):
    with pytest.raises(PlanError, match=message):
        compression.apply(plan, tiny.model, tiny.arch)


def test_the_teachers_own_weight_files_are_read_instead_of_a_copy_where_they_match(tiny, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from llmtailor.compression import originals
    from llmtailor.errors import UserError

    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in stored_layers(tiny.arch)})
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert tiny.weight_files and all(f.suffix == ".safetensors" for f in tiny.weight_files)
    own = tmp_path / "own"
    own.mkdir()
    sources = tuple(shutil.copy(f, own) for f in tiny.weight_files)
    kept = originals.Originals(tiny.model, tmp_path / "copies", "tiny", tuple(map(Path, sources)))
    assert not (tmp_path / "copies").exists()  # nothing written: the model's file is read
    with originals.applied(plan, tiny.model, tiny.arch, kept) as model:
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    # Stored in another dtype than loaded: the file is not the teacher as loaded, so a copy is written.
    half = tmp_path / "half.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in tiny.model.named_parameters()}, half)
    copied = originals.Originals(tiny.model, tmp_path / "copies", "tiny", (half,))
    assert copied.path.parent == tmp_path / "copies" and copied.path.is_file()
    # One value changed on disk: a copy too (the bytes are compared, not only names, dtypes and shapes).
    name, value = next(iter(tiny.model.named_parameters()))
    changed = tmp_path / "changed.safetensors"
    save_file({k: (v + 1 if k == name else v).contiguous() for k, v in tiny.model.named_parameters()}, changed)
    assert originals.Originals(tiny.model, tmp_path / "copies", "tiny", (changed,)).path == copied.path
    # The model's file rewritten during a search: the teacher cannot be restored, and that is an error, not a guess.
    Path(sources[0]).write_bytes(Path(sources[0]).read_bytes() + b" ")
    with pytest.raises(originals.TeacherChanged, match="changed or was removed while a search read") as caught:
        with originals.applied(plan, tiny.model, tiny.arch, kept):
            pass
    assert isinstance(caught.value, UserError)
    Path(sources[0]).unlink()  # and removed: the same
    with pytest.raises(originals.TeacherChanged, match="changed or was removed"):
        kept.restore([tiny.model.model.embed_tokens.weight])
    tiny.model.load_state_dict(before)  # the session's shared teacher, for the tests after this one


def test_a_plan_applied_in_the_teachers_tensors_computes_the_same_and_is_undone(tiny, tmp_path):
    from llmtailor.compression import originals

    plan = CompressionPlan(precision={x.name: LayerPrecision(4, 32) for x in stored_layers(tiny.arch)},
                           sparsity={tiny.arch.linears[0].name: LayerSparsity(0.5)})
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    kept = originals.Originals(tiny.model, tmp_path, "tiny")
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        expected = compression.apply(plan, tiny.model, tiny.arch)(ids).logits
        with originals.applied(plan, tiny.model, tiny.arch, kept) as model:
            assert model.model.embed_tokens.weight is tiny.model.model.embed_tokens.weight  # written in place
            assert torch.equal(model(ids).logits, expected)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    with pytest.raises(RuntimeError, match="measuring broke"), originals.applied(plan, tiny.model, tiny.arch, kept):
        raise RuntimeError("measuring broke")
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    # A file cut short by a killed writer is written again, not read.
    kept.path.write_bytes(kept.path.read_bytes()[:1000])
    again = originals.Originals(tiny.model, tmp_path, "tiny")
    with originals.applied(plan, tiny.model, tiny.arch, again):
        pass
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
