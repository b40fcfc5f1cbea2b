"""Distillation: the KD loss, the schedule, training that lowers it, students that save and reload, bad students."""

import copy
import dataclasses
import sys

import pytest
import torch

from llmtailor.compression import distill, structure, students, trained
from llmtailor.hw_profiles import host
from llmtailor.plan import CompressionPlan, Distillation, PlanError, Student


def windows(tiny, count=8, tokens=32):
    return torch.randint(3, tiny.arch.vocab_size, (count, tokens), generator=torch.Generator().manual_seed(0))


def two_block_student(tiny):
    arch = tiny.arch
    return structure.cut(tiny.model, arch, structure.Cut((0, 3), {}, {}, arch.num_heads, arch.intermediate_size))


def importance_and_students(tiny, tmp_path):
    """The tiny model's importance scores and its students kept in tmp_path, from 4 calibration windows."""
    from llmtailor import text
    from llmtailor.compression import calibration, trained

    ids = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=4, tokens=128)
    stats = calibration.collect(tiny.model, tiny.arch, ids)
    return structure.importance(tiny.model, tiny.arch, stats, ids), trained.TrainedStudents(
        tiny.model, lambda: ids, "text-key", tmp_path)


def full_kl(teacher_logits, student_logits, temperature):
    p = torch.log_softmax(teacher_logits / temperature, -1)
    q = torch.log_softmax(student_logits / temperature, -1)
    return (p.exp() * (p - q)).sum(-1).mean() * temperature**2


def test_kd_loss_is_the_full_kl_with_every_token_kept_and_a_lower_bound_with_fewer():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    for k, exact in ((40, True), (8, False), (1, False)):
        top = torch.log_softmax(teacher / 2.0, -1).topk(k, -1)
        loss = distill.kd_loss(student, top.indices, top.values, 2.0)
        if exact:
            assert loss == pytest.approx(float(full_kl(teacher, student, 2.0)), rel=1e-4)
        else:
            assert 0 < loss <= float(full_kl(teacher, student, 2.0)) + 1e-5
    top = torch.log_softmax(teacher / 2.0, -1).topk(8, -1)
    assert distill.kd_loss(teacher, top.indices, top.values, 2.0) == pytest.approx(0.0, abs=1e-5)


def test_the_schedule_warms_up_then_decays_to_zero():
    rates = [distill.learning_rate_at(s, 100, 1e-3) for s in range(100)]
    assert rates[0] < rates[4] == pytest.approx(1e-3) and rates[50] < rates[10] and rates[-1] < 1e-5


def test_distillation_lowers_the_loss_and_the_student_saves_and_reloads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=16)
    assert targets.top_ids.shape == (8, 32, 16) and (targets.rest_logprob <= 0).all()
    student = two_block_student(tiny)
    seen = []
    trained = distill.distill(student, targets, Distillation(steps=40, learning_rate=3e-3), seed=0,
                              progress=lambda step, loss: seen.append(step))
    assert trained.steps == 40 and seen == list(range(1, 41)) and trained.seconds > 0
    assert sum(trained.losses[-5:]) / 5 < 0.7 * sum(trained.losses[:5]) / 5
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = windows(tiny, 2)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reloaded(ids).logits)


def test_the_seed_makes_a_run_repeatable_and_ce_needs_no_teacher_distribution(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=1.0, top_k=4)
    runs = []
    for _ in range(2):
        student = two_block_student(tiny)
        runs.append(distill.distill(student, targets, Distillation(steps=5, loss="kl+ce", learning_rate=1e-3)).losses)
    assert runs[0] == runs[1]
    ce = distill.distill(two_block_student(tiny), targets, Distillation(steps=3, loss="ce", learning_rate=1e-3))
    assert all(loss > 0 for loss in ce.losses)


def test_a_student_from_a_smaller_config_starts_from_the_teacher(tiny):
    config = copy.deepcopy(tiny.model.config)
    config.num_hidden_layers, config.intermediate_size = 2, 96
    student, copied = students.from_config(tiny.model, config)
    assert copied == sum(1 for _ in student.parameters())  # narrower MLP: the leading channels
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, tiny.model.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, tiny.model.model.layers[0].mlp.up_proj.weight[:96])
    assert [students.teacher_block(i, 3, 30) for i in range(3)] == [0, 15, 29]


@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c, "num_hidden_layers", 9), "between 1 and 4 blocks"),
    (lambda c: setattr(c, "num_hidden_layers", 0), "between 1 and 4 blocks"),
    (lambda c: setattr(c, "num_attention_heads", 3), "multiple of its KV heads"),
    (lambda c: setattr(c, "vocab_size", 100), "share the teacher's vocabulary"),
    (lambda c: setattr(c, "model_type", "gpt2"), "teacher's family"),
])
def test_bad_students_are_refused_before_training(tiny, edit, message):
    config = copy.deepcopy(tiny.model.config)
    edit(config)
    with pytest.raises(PlanError, match=message):
        students.check_config(tiny.model.config, config)


@pytest.mark.parametrize("fields, message", [
    (dict(steps=-1), "steps must be a whole number"), (dict(temperature=0), "temperature must be positive"),
    (dict(loss="mse"), "loss must be one of"), (dict(learning_rate=0), "learning rate must be positive"),
    (dict(top_k=0), "top_k must be at least 1"), (dict(ce_weight=-1), "ce_weight must be >= 0"),
])
def test_bad_recipes_are_refused(fields, message):
    with pytest.raises(PlanError, match=message):
        Distillation(**fields)


def test_a_run_needs_a_step_and_older_plans_keep_their_json(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny, 2), temperature=1.0, top_k=2)
    with pytest.raises(PlanError, match="at least 1 step"):
        distill.distill(two_block_student(tiny), targets, Distillation())
    assert set(CompressionPlan().to_dict()["student"]["distillation"]) == {"steps", "temperature", "loss",
                                                                          "learning_rate", "qat"}
    plan = CompressionPlan.from_json(CompressionPlan(student={"distillation": {"top_k": 8}}).to_json())
    assert plan.student.distillation.top_k == 8


def test_teacher_targets_are_cached_and_a_damaged_file_is_remade(tiny, tmp_path, monkeypatch):
    made = []
    real = distill.teacher_targets
    monkeypatch.setattr(distill, "teacher_targets", lambda *a, **k: made.append(1) or real(*a, **k))
    first = distill.load_or_compute_targets(tiny.model, windows(tiny, 3), 2.0, 5, "tiny", tmp_path)
    again = distill.load_or_compute_targets(tiny.model, windows(tiny, 3), 2.0, 5, "tiny", tmp_path)
    assert made == [1] and torch.equal(first.top_ids, again.top_ids) and torch.equal(first.windows, again.windows)
    (path,) = (tmp_path / "teacher").iterdir()
    path.write_bytes(b"broken")
    remade = distill.load_or_compute_targets(tiny.model, windows(tiny, 3), 2.0, 5, "tiny", tmp_path)
    assert made == [1, 1] and torch.allclose(remade.top_logprobs, first.top_logprobs)


def test_qat_fake_quant_is_the_real_quantizers_grid_with_a_straight_through_gradient():
    from llmtailor.compression.quantize import rtn
    from llmtailor.plan import LayerPrecision

    torch.manual_seed(0)
    weight = torch.randn(6, 40, requires_grad=True)
    precision = LayerPrecision(4, 16)
    fake = distill.FakeQuantize(precision)(weight)
    assert torch.equal(fake.detach(), rtn(weight.detach(), precision).dequantize())
    assert len(torch.unique(fake.detach()[0, :16])) <= 16  # one group of 16 inputs: at most 2^4 levels
    (fake * torch.arange(40.0)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(40.0).expand(6, 40))  # the rounding passes the gradient unchanged


def test_qat_trains_through_the_grid_and_leaves_float_weights_for_the_quantizer(tiny):
    from llmtailor.plan import LayerPrecision

    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    student = two_block_student(tiny)
    names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    before = student.model.layers[0].mlp.up_proj.weight.clone()
    trained = distill.distill(student, targets, Distillation(steps=10, learning_rate=3e-3, qat=True),
                              qat_precision={n: LayerPrecision(4, 32) for n in names})
    after = student.model.layers[0].mlp.up_proj.weight
    assert trained.steps == 10 and not torch.equal(before, after)
    assert len(torch.unique(after[0, :32])) > 16  # float weights again, not the rounded ones
    assert not any("parametrizations" in n for n, _ in student.named_parameters())
    with pytest.raises(PlanError, match="needs the precision"):
        distill.distill(two_block_student(tiny), targets, Distillation(steps=1, qat=True))
    with pytest.raises(PlanError, match="does not have"):
        distill.distill(two_block_student(tiny), targets, Distillation(steps=1, qat=True),
                        qat_precision={"model.layers.9.mlp.up_proj": LayerPrecision(4)})


def test_lora_trains_low_rank_updates_and_merges_them(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    student = two_block_student(tiny)
    before = {n: p.clone() for n, p in student.named_parameters()}
    trained = distill.distill(student, targets, Distillation(steps=30, learning_rate=3e-3, lora_rank=2))
    assert sum(trained.losses[-5:]) < sum(trained.losses[:5])
    after = dict(student.named_parameters())
    assert set(after) == set(before)  # merged: a plain model of the same shapes again
    change = after["model.layers.1.mlp.down_proj.weight"] - before["model.layers.1.mlp.down_proj.weight"]
    assert change.abs().max() > 0 and torch.linalg.matrix_rank(change) <= 2
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # only the adapters trained
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_lora_only_reads_the_frozen_weights_so_a_student_may_share_its_teachers(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    arch = tiny.arch
    teacher = {n: p.clone() for n, p in tiny.model.named_parameters()}
    student = structure.cut(tiny.model, arch, structure.Cut((0, 3), {}, {}, arch.num_heads, arch.intermediate_size),
                            share=True)  # two whole blocks: every tensor is the teacher's
    shared = student.model.layers[0].mlp.down_proj.weight
    assert shared is tiny.model.model.layers[0].mlp.down_proj.weight
    distill.distill(student, targets, Distillation(steps=5, learning_rate=3e-3, lora_rank=2))
    assert all(torch.equal(p, teacher[n]) for n, p in tiny.model.named_parameters())  # the teacher is untouched
    assert student.model.layers[0].mlp.down_proj.weight is not shared  # the student has its own merged weight
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, shared)
    assert not any("lora" in n for n, _ in student.named_parameters())  # the adapters are gone


def test_the_adapters_a_lora_run_returns_rebuild_the_student_from_its_start(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    student, start = two_block_student(tiny), two_block_student(tiny)
    run = distill.distill(student, targets, Distillation(steps=4, learning_rate=3e-3, lora_rank=2))
    assert set(run.adapters) == set(distill.named_block_linears(student))
    assert all(a.shape[0] == 2 and b.shape[1] == 2 for a, b in run.adapters.values())
    distill.merge_adapters(start, run.adapters)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), start.parameters(), strict=True))
    assert distill.distill(two_block_student(tiny), targets, Distillation(steps=1)).adapters == {}  # full weights


@pytest.mark.parametrize("loss", ["kl", "ce", "kl+ce"])
def test_the_loss_formed_piece_by_piece_equals_the_whole_logits_loss_and_its_gradient(tiny, monkeypatch, loss):
    monkeypatch.setattr(distill, "LOSS_TOKENS", 48)  # 4 windows of 32 tokens: two pieces and a shorter third
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8, hidden=True)
    recipe = Distillation(steps=1, loss=loss, hidden_weight=0.5, ce_weight=0.7)
    student = two_block_student(tiny).requires_grad_(True)
    index = torch.tensor([5, 0, 3, 6])
    assert distill._head_is_separable(student, targets.windows[:1, :8])
    figures = []
    for form in (lambda: distill._loss(student, targets.windows[index], index, targets, recipe, None),
                 lambda: distill._loss_by_pieces(student, targets.windows[index], index, targets, recipe)):
        student.zero_grad()
        value = form()
        value.backward()
        figures.append((value.item(), student.model.layers[1].mlp.up_proj.weight.grad.clone(),
                        student.lm_head.weight.grad.clone()))
    (whole, up, head), (pieces, up_pieces, head_pieces) = figures
    assert pieces == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(up_pieces, up, rtol=1e-4, atol=1e-7) and torch.allclose(head_pieces, head, rtol=1e-4,
                                                                                     atol=1e-7)


def test_a_step_taken_one_window_at_a_time_is_the_same_step(tiny):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    recipe = Distillation(steps=2, learning_rate=3e-3, loss="kl+ce")
    runs = []
    for per_pass in (None, 1, 3):  # 3: passes of 3 and 1 windows
        student = two_block_student(tiny)
        runs.append((distill.distill(student, targets, recipe, seed=1, windows_per_pass=per_pass),
                     student.model.layers[1].mlp.up_proj.weight.clone()))
    (whole, weight), *others = runs
    for run, other in others:
        assert run.losses == pytest.approx(whole.losses, rel=1e-5)
        assert torch.allclose(other, weight, rtol=1e-4, atol=1e-6)
    assert not torch.equal(weight, two_block_student(tiny).model.layers[1].mlp.up_proj.weight)  # it trained


def test_a_head_that_caps_its_logits_is_trained_on_whole_logits(tiny, monkeypatch):
    targets = distill.teacher_targets(tiny.model, windows(tiny), temperature=2.0, top_k=8)
    student = two_block_student(tiny)
    assert distill._head_is_separable(student, targets.windows[:1, :8])
    student.get_output_embeddings().register_forward_hook(lambda m, args, out: 3 * torch.tanh(out / 3))
    assert not distill._head_is_separable(student, targets.windows[:1, :8])
    monkeypatch.setattr(distill, "_loss_by_pieces", None)  # called, it would fail
    trained = distill.distill(student, targets, Distillation(steps=3, learning_rate=3e-3))
    assert trained.steps == 3


def test_lora_with_qat_and_a_negative_rank_are_refused():
    with pytest.raises(PlanError, match="not supported yet"):
        Distillation(qat=True, lora_rank=4)
    with pytest.raises(PlanError, match="lora_rank must be >= 0"):
        Distillation(lora_rank=-1)


def test_full_kd_loss_is_the_top_k_loss_with_every_token_kept_and_hidden_loss_is_scale_free():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    top = torch.log_softmax(teacher / 2.0, -1).topk(40, -1)
    assert distill.full_kd_loss(student, teacher, 2.0) == pytest.approx(
        float(distill.kd_loss(student, top.indices, top.values, 2.0)), rel=1e-4)
    hidden = torch.randn(2, 5, 16)
    assert distill.hidden_loss(hidden, hidden) == 0
    assert distill.hidden_loss(hidden * 2, hidden) == pytest.approx(1.0)
    assert distill.hidden_loss(hidden * 20, hidden * 10) == pytest.approx(1.0)


def test_hidden_state_matching_trains_from_kept_or_online_teacher_states(tiny):
    ids = windows(tiny)
    targets = distill.teacher_targets(tiny.model, ids, temperature=2.0, top_k=16, hidden=True)
    assert targets.hidden.shape == (8, 32, tiny.arch.hidden_size) and targets.hidden.dtype == torch.float16
    recipe = Distillation(steps=30, learning_rate=3e-3, hidden_weight=1.0)
    kept = distill.distill(two_block_student(tiny), targets, recipe, seed=0)
    assert sum(kept.losses[-5:]) < 0.8 * sum(kept.losses[:5])
    online = distill.distill(two_block_student(tiny), targets, recipe, seed=0, teacher=tiny.model)
    assert online.losses[0] == pytest.approx(kept.losses[0], rel=0.05)  # top-16 of a tiny vocabulary, float16 states
    with pytest.raises(PlanError, match="hidden states"):
        distill.distill(two_block_student(tiny), distill.teacher_targets(tiny.model, ids, 2.0, 16), recipe)
    with pytest.raises(PlanError, match="hidden_weight"):
        Distillation(hidden_weight=-1.0)


def test_apply_trains_a_cut_student_once_caches_it_and_quantizes_what_it_learned(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmtailor import compression, text
    from llmtailor.compression import calibration, trained
    from llmtailor.plan import LayerPrecision

    ids = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=4, tokens=128)
    stats = calibration.collect(tiny.model, tiny.arch, ids)
    scores = structure.importance(tiny.model, tiny.arch, stats, ids)
    made = []
    students = trained.TrainedStudents(tiny.model, lambda: made.append(1) or ids, "text-key", tmp_path)
    recipe = Distillation(steps=12, learning_rate=3e-3)
    four_bit = {lin.name: LayerPrecision(4, 32) for lin in tiny.arch.linears if lin.block is not None}
    plan = CompressionPlan(precision=four_bit, student=Student(layers=(0, 3), distillation=recipe))
    with pytest.raises(PlanError, match="no teacher targets were given"):
        compression.apply(plan, tiny.model, tiny.arch, importance=scores)
    first = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    assert students.last.trained_now and students.last.steps == 12 and len(students.last.losses) == 12
    again = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    assert not students.last.trained_now and students.last.steps == 12 and made == [1]
    x = windows(tiny, 2)
    with torch.no_grad():
        assert torch.equal(first(x).logits, again(x).logits)
        untrained = compression.apply(dataclasses.replace(plan, student=Student(layers=(0, 3))), tiny.model,
                                      tiny.arch, importance=scores)
        assert not torch.equal(first(x).logits, untrained(x).logits)
    kept = list((tmp_path / "students").iterdir())
    assert len(kept) == 1 and AutoModelForCausalLM.from_pretrained(kept[0]).config.num_hidden_layers == 2
    qat = dataclasses.replace(plan, student=Student(layers=(0, 3), distillation=dataclasses.replace(recipe, qat=True)))
    compression.apply(qat, tiny.model, tiny.arch, importance=scores, students=students)
    assert students.last.trained_now and len(list((tmp_path / "students").iterdir())) == 2
    dense_qat = dataclasses.replace(qat, precision={})
    with pytest.raises(PlanError, match="needs quantized layers"):
        compression.apply(dense_qat, tiny.model, tiny.arch, importance=scores, students=students)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_memory_freed_after_training_goes_back_to_the_system_and_a_trials_peak_restarts():
    # Small blocks freed among live ones stay in glibc's heap (what a distillation run's gradients and moments left
    # resident in a sweep) until released: 200 MB of 4 kB blocks, every 64th kept.
    code = """
from llmtailor.hw_profiles import host
blocks = [bytearray(4000) for _ in range(50000)]
kept = blocks[::64]
del blocks
before = host.resident_bytes()
assert host.release_freed_memory()
print(before - host.resident_bytes())
"""
    assert host.in_a_fresh_process(code) > 100e6
    # A trial's own peak: the process's peak restarted from what it holds now (a freed 300 MB no longer counts).
    code = """
from llmtailor.hw_profiles import host
block = bytearray(300_000_000)
block[::4096] = bytes(len(block[::4096]))
del block
before = host.resident_bytes(peak=True)
assert host.restart_peak()
print(before - host.resident_bytes(peak=True))
"""
    assert host.in_a_fresh_process(code) > 250e6


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_while_a_student_trains_on_a_cpu_blocks_of_half_a_megabyte_leave_no_holes_in_the_heap():
    # 600 kB blocks (a training window's activations are 300-800 kB), every other one freed: in glibc's heap the
    # freed half stays resident among the live one; while training (trained.heap_kept_small) each block is its own
    # mapping and goes back when freed; afterwards the sweep's setting (16 MB) holds again.
    code = """
from llmtailor.compression import trained
from llmtailor.hw_profiles import host

def resident_drop_after_freeing_every_other_block():
    blocks = [bytearray(600_000) for _ in range(300)]
    before = host.resident_bytes()
    del blocks[::2]
    drop = before - host.resident_bytes()
    del blocks
    host.release_freed_memory()
    return drop

host.return_large_blocks_to_the_os()
heap = resident_drop_after_freeing_every_other_block()
with trained.heap_kept_small("cpu") as after_step:
    mapped = resident_drop_after_freeing_every_other_block()
    assert after_step is host.release_freed_memory
after = resident_drop_after_freeing_every_other_block()
print(1.0 if heap < 20e6 and mapped > 80e6 and after < 20e6 else 0.0)
"""
    assert host.in_a_fresh_process(code) == 1.0
    with trained.heap_kept_small("cuda") as after_step:  # a GPU's activations are not in this process's heap
        assert after_step() is None


def test_a_student_that_would_not_fit_in_memory_is_refused_before_training_with_the_figures(tiny, tmp_path,
                                                                                            monkeypatch):
    from llmtailor import compression
    from llmtailor.compression import trained

    scores, students = importance_and_students(tiny, tmp_path)
    lora = Distillation(steps=3, learning_rate=3e-3, lora_rank=2)
    plan = CompressionPlan(student=Student(layers=(0, 3), distillation=lora))
    cut = structure.cut(tiny.model, tiny.arch, structure.choose(tiny.arch, plan.student, scores), share=True)
    need = distill.training_bytes(cut, lora, trained.WINDOW_TOKENS, {p.data_ptr() for p in tiny.model.parameters()})
    alone = distill.training_bytes(cut, lora, trained.WINDOW_TOKENS)
    full = distill.training_bytes(cut, Distillation(steps=3), trained.WINDOW_TOKENS)
    assert alone < need < full  # merging adapters into shared weights makes new ones; full training keeps moments
    monkeypatch.setattr(host, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(distill.NotEnoughMemory, match=r"needs about [\d,]+ MB more memory and [\d,]+ MB is available"):
        compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
    assert not (tmp_path / "students").exists()  # nothing trained, nothing kept
    monkeypatch.setattr(host, "available_memory_bytes", lambda: need)
    compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
    assert students.last.trained_now


def test_a_kept_lora_student_shares_what_training_left_alone_with_the_teacher_only_when_asked(tiny, tmp_path):
    from llmtailor import compression

    scores, students = importance_and_students(tiny, tmp_path)
    lora = Distillation(steps=3, learning_rate=3e-3, lora_rank=2)
    plan = CompressionPlan(student=Student(layers=(0, 3), distillation=lora))
    compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
    kept = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
    assert not students.last.trained_now
    assert kept.model.embed_tokens.weight is tiny.model.model.embed_tokens.weight  # untrained: the teacher's own
    assert kept.model.layers[0].mlp.up_proj.weight is not tiny.model.model.layers[0].mlp.up_proj.weight  # trained
    assert not torch.equal(kept.model.layers[0].mlp.up_proj.weight, tiny.model.model.layers[0].mlp.up_proj.weight)
    own = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    assert not any(p is q for p in own.parameters() for q in tiny.model.parameters())  # share=False: its own


def test_a_lora_student_is_kept_as_its_adapters_and_rebuilds_to_the_same_weights(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmtailor import compression

    scores, students = importance_and_students(tiny, tmp_path)
    student = Student(layers=(0, 2, 3), heads=dict.fromkeys((0, 2, 3), 2), mlp_width=dict.fromkeys((0, 2, 3), 96),
                      distillation=Distillation(steps=3, learning_rate=3e-3, lora_rank=2))
    plan = CompressionPlan(student=student)
    first = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    entry = tmp_path / "students" / students.key(plan, tiny.arch)
    assert sorted(p.name for p in entry.iterdir()) == ["adapters.safetensors", "training.json"]
    from llmtailor import files

    # safetensors writes 0600; a student cache shared by other users' workers must be readable to them
    assert {p.stat().st_mode & 0o777 for p in entry.iterdir()} == {0o666 & ~files.umask()}
    weights = sum(p.numel() * 4 for p in first.parameters())
    assert (entry / "adapters.safetensors").stat().st_size < weights / 10  # factors, not the merged weights
    ids = torch.arange(1, 33)[None]
    for share in (False, True):
        again = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=share)
        assert not students.last.trained_now and students.last.steps == 3
        assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters(), strict=True))
        with torch.no_grad():
            assert torch.equal(first(ids).logits, again(ids).logits)
    # An entry kept before adapters were (the whole model, save_pretrained) still loads.
    (entry / "adapters.safetensors").unlink()
    first.save_pretrained(entry)
    assert AutoModelForCausalLM.from_pretrained(entry).config.num_hidden_layers == 3
    older = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    assert not students.last.trained_now
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), older.parameters(), strict=True))


def test_kept_adapters_that_do_not_fit_the_cut_are_trained_again(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmtailor import compression

    scores, students = importance_and_students(tiny, tmp_path)
    plan = CompressionPlan(student=Student(layers=(0, 3), distillation=Distillation(steps=2, lora_rank=2)))
    compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    stored = tmp_path / "students" / students.key(plan, tiny.arch) / "adapters.safetensors"
    good = load_file(str(stored))
    name = "model.layers.1.mlp.up_proj.a"
    for damage in ({name: good[name][:, :-1].contiguous()}, {name: good[name][:0]}, {"model.layers.7.mlp.up_proj.a": good[name].clone()}):
        save_file({**good, **damage}, str(stored))
        compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
        assert students.last.trained_now and stored.is_file()  # deleted, trained and kept again
        assert {k: v.shape for k, v in load_file(str(stored)).items()} == {k: v.shape for k, v in good.items()}


def test_a_student_applied_in_the_teachers_tensors_holds_no_weights_of_its_own_and_is_undone(tiny, tmp_path):
    from llmtailor import compression
    from llmtailor.compression import originals, trained
    from llmtailor.evaluators.cost import stored_layers
    from llmtailor.plan import LayerPrecision

    scores, students = importance_and_students(tiny, tmp_path / "own")
    kept_blocks = (0, 1, 3)
    student = Student(layers=kept_blocks, heads=dict.fromkeys(kept_blocks, 2), mlp_width=dict.fromkeys(kept_blocks, 96),
                      distillation=Distillation(steps=2, learning_rate=3e-3, lora_rank=2))
    plan = CompressionPlan(student=student, precision={x.name: LayerPrecision(4, 32) for x in stored_layers(tiny.arch)})
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    ids = torch.arange(1, 33)[None]
    own = compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students)
    with torch.no_grad():
        expected = own(ids).logits
    teachers = {p.untyped_storage().data_ptr() for p in tiny.model.parameters()}
    undone = originals.Originals(tiny.model, tmp_path / "copies", "tiny")
    in_teacher = trained.TrainedStudents(tiny.model, students.windows, "text-key", tmp_path / "in-teacher")
    for made, kept_by in (("trained now", in_teacher), ("kept", in_teacher), ("kept", students)):
        with originals.applied(plan, tiny.model, tiny.arch, undone, importance=scores, students=kept_by) as model:
            assert kept_by.last.trained_now == (made == "trained now")
            assert model.config.num_hidden_layers == 3 and model.model.layers[0].mlp.up_proj.weight.shape[0] == 96
            # the cut, the student's weights and their 4-bit values all live in the teacher's memory
            assert all(p.untyped_storage().data_ptr() in teachers for p in model.parameters())
            with torch.no_grad():
                assert torch.allclose(model(ids).logits, expected, atol=1e-5), made
        assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items()), made
    # A kept entry that breaks once the teacher holds the cut cannot be trained again in that trial: a clear error,
    # the teacher restored, and the next trial trains it.
    entry = tmp_path / "in-teacher" / "students" / in_teacher.key(plan, tiny.arch)
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(1)}, str(next(entry.glob("*.safetensors"))))
    fresh = trained.TrainedStudents(tiny.model, students.windows, "text-key", tmp_path / "in-teacher")
    with pytest.raises(PlanError, match="did not load and was deleted"):
        with originals.applied(plan, tiny.model, tiny.arch, undone, importance=scores, students=fresh):
            pass
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    with originals.applied(plan, tiny.model, tiny.arch, undone, importance=scores, students=fresh):
        assert fresh.last.trained_now
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_a_kept_student_that_does_not_match_its_cut_is_trained_again(tiny, tmp_path):
    from safetensors.torch import save_file

    from llmtailor import compression

    scores, students = importance_and_students(tiny, tmp_path)
    plan = CompressionPlan(student=Student(layers=(0, 3), distillation=Distillation(steps=2, lora_rank=2)))
    compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
    entry = tmp_path / "students" / students.key(plan, tiny.arch)
    for damage in ("shape", "missing"):
        stored = next(entry.glob("*.safetensors"))
        tensors = {"model.embed_tokens.weight": torch.zeros(3, 3)} if damage == "shape" else {}
        save_file({**tensors, "unrelated": torch.zeros(1)}, str(stored))
        compression.apply(plan, tiny.model, tiny.arch, importance=scores, students=students, share=True)
        assert students.last.trained_now and (entry / "training.json").is_file()  # trained and kept again
