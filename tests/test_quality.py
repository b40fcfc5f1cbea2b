import pytest
import torch

from llmtailor import compression, models, text
from llmtailor.errors import UserError
from llmtailor.evaluators import quality, tasks
from llmtailor.evaluators.cost import stored_layers
from llmtailor.plan import CompressionPlan, LayerPrecision


@pytest.fixture(scope="module")
def reference(tiny):
    return quality.Reference(tiny.model, tiny.tokenizer, text.split("pydoc").evaluation, windows=2, window_tokens=64)


def test_teacher_has_zero_kl_and_finite_perplexity(tiny, reference):
    q = quality.measure(tiny.model, reference)
    assert q.kl == pytest.approx(0.0, abs=1e-6)
    assert 1 < q.perplexity < 10 * 512 and q.tokens == 128


def test_fewer_bits_cost_more_fidelity(tiny, reference):
    kls = []
    for bits in (8, 4, 2):
        plan = CompressionPlan(precision={x.name: LayerPrecision(bits) for x in stored_layers(tiny.arch)})
        kls.append(quality.measure(compression.apply(plan, tiny.model, tiny.arch), reference).kl)
    assert 0 < kls[0] < kls[1] < kls[2]


def test_nan_outputs_are_an_error(tiny, reference):
    import copy

    broken = copy.deepcopy(tiny.model)
    broken.model.norm.weight.data[:] = float("nan")
    with pytest.raises(FloatingPointError):
        quality.measure(broken, reference)


def test_pydoc_cloze_items_are_well_formed_and_stable():
    docs = text.split("pydoc").task
    items = tasks.pydoc_cloze_items(docs, limit=20)
    assert items == tasks.pydoc_cloze_items(docs, limit=20)
    assert len(items) == 20
    calibration = " ".join(text.split("pydoc").calibration)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert len(item["context"].split()) == tasks.CONTEXT_WORDS
        assert all(len(c.split()) == tasks.CONTINUATION_WORDS for c in item["choices"])
        assert item["context"] not in calibration  # built from held-out documents


def test_lm_eval_accuracy_of_an_in_memory_model(tiny, tmp_path):
    entries = tasks.resolve_tasks(["pydoc_cloze"], text.split("pydoc").task, 8, tmp_path)
    accuracy = tasks.accuracy(tiny.model, tiny.tokenizer, entries)
    assert set(accuracy) == {"pydoc_cloze"} and 0.0 <= accuracy["pydoc_cloze"] <= 1.0
    scores = tasks.item_scores(tiny.model, tiny.tokenizer, entries)["pydoc_cloze"]
    assert len(scores) == 8 and set(scores) <= {0.0, 1.0} and sum(scores) / 8 == accuracy["pydoc_cloze"]


@pytest.mark.parametrize("cut", [False, True], ids=["teacher", "blocks-and-kv-groups-cut"])
def test_shared_context_log_likelihoods_equal_lm_evals_own(tiny, cut):
    """Each choice scored after its context's KV cache equals lm-eval's full-sequence score: same log-likelihoods
    to float rounding, same greedy flags, in request order; also on a cut model (renumbered blocks, fewer KV groups)
    and for a request too long for the window, which goes to lm-eval's own code."""
    from lm_eval.models.huggingface import HFLM

    from llmtailor.compression import structure
    from llmtailor.plan import Student

    model = tiny.model
    if cut:
        from llmtailor.compression import calibration

        windows = calibration.calibration_windows(tiny.tokenizer, text.split("pydoc").calibration, count=2, tokens=32)
        scores = structure.importance(tiny.model, tiny.arch, calibration.collect(tiny.model, tiny.arch, windows),
                                      windows)
        student = Student(layers=(0, 2, 3), heads={b: 2 for b in (0, 2, 3)})
        model = structure.cut(tiny.model, tiny.arch, structure.choose(tiny.arch, student, scores))
    items = tasks.pydoc_cloze_items(text.split("pydoc").task, limit=3)
    requests = []
    for item in items:
        context = tiny.tokenizer(item["context"])["input_ids"]
        for choice in item["choices"]:
            requests.append(((item["context"], " " + choice), context, tiny.tokenizer(" " + choice)["input_ids"]))
    requests.append((("x", " y"), [5], [7]))  # a one-token continuation
    theirs = HFLM(pretrained=model, tokenizer=tiny.tokenizer, batch_size=8, device="cpu")
    expected = theirs._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len({s for s, _ in expected}) > 4  # the scores differ between choices: the comparison can fail
    # 4 choices a batch: one item each; 64: every item in one batch, the one-token context left-padded beside them.
    for batch_size in (4, 64):
        ours = tasks._shared_context_lm_class()(pretrained=model, tokenizer=tiny.tokenizer, batch_size=batch_size,
                                                device="cpu")
        got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
        assert [g for _, g in got] == [g for _, g in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4, rel=1e-5)
    # A window shorter than the items: lm-eval's own code scores them (it truncates the context from the left).
    ours._max_length = theirs._max_length = len(requests[0][1]) + 2
    truncated = [s for s, _ in theirs._loglikelihood_tokens(requests, disable_tqdm=True)]
    assert truncated != pytest.approx([s for s, _ in expected], abs=1e-4, rel=1e-5)
    assert [s for s, _ in ours._loglikelihood_tokens(requests, disable_tqdm=True)] == truncated


def test_paired_difference_by_hand():
    # Items 1 and 4 differ (one each way), items 2 and 3 agree: mean 0, differences (1, 0, 0, -1).
    assert tasks.paired_difference([1, 1, 0, 0], [0, 1, 0, 1]) == pytest.approx((0.0, 1.96 * (2 / 3 / 4) ** 0.5))
    same = tasks.paired_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert same == (0.0, 0.0)  # a model against itself: no difference, no uncertainty
    assert tasks.paired_difference([1.0], [0.0])[1] == float("inf")
    with pytest.raises(ValueError, match="same items"):
        tasks.paired_difference([1, 0], [1])


def test_unknown_task_is_refused_before_any_work():
    with pytest.raises(UserError, match="unknown lm-eval task"):
        tasks.check_task_names(["pydoc_cloze", "no_such_task_xyz"])


def test_text_splits_are_disjoint_and_deterministic(tmp_path):
    s = text.split("pydoc")
    assert s == text.split("pydoc")
    assert not set(s.calibration) & set(s.evaluation) and not set(s.evaluation) & set(s.task)
    assert s.calibration and s.evaluation and s.task
    own = tmp_path / "mine.txt"
    own.write_text("\n\n".join(f"paragraph number {i} of my own text." for i in range(40)))
    assert sum(map(len, (text.split(str(own)).calibration, text.split(str(own)).evaluation))) > 0


def test_a_folder_of_text_files_is_a_source_and_links_are_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph of a\n\nsecond paragraph of a")
    (tmp_path / "b").write_text("only paragraph of b\n\nand another\n\nand a third")
    (tmp_path / "a-again").symlink_to(tmp_path / "a.txt")
    docs = text.load_documents(str(tmp_path))
    assert docs == ["first paragraph of a", "second paragraph of a", "only paragraph of b", "and another", "and a third"]


@pytest.mark.parametrize("source, message", [
    ("no/such/file.txt", "neither"),
    ("hf:onlyname", "hf:NAME"),
])
def test_bad_text_sources(source, message):
    with pytest.raises(UserError, match=message):
        text.load_documents(source)


def test_bad_jsonl_text(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(UserError, match="'text' field"):
        text.load_documents(str(path))


def test_default_model_location_is_found_without_importing_its_package():
    path = models.default_model_path()
    assert path.name == models.DEFAULT_MODEL_FILE and path.stat().st_size > 50_000_000


def test_slices_of_the_windows_combine_into_the_whole_measurement(tiny, reference):
    plan = CompressionPlan(precision={lin.name: LayerPrecision(4, 32) for lin in stored_layers(tiny.arch)})
    model = compression.apply(plan, tiny.model, tiny.arch)
    whole = quality.measure(model, reference)
    parts = [quality.measure(model, reference, slice(0, 1)), quality.measure(model, reference, slice(1, None))]
    assert parts[0].tokens < whole.tokens
    joined = quality.combined(parts)
    assert joined.tokens == whole.tokens and joined.window_nll == pytest.approx(whole.window_nll)
    assert joined.kl == pytest.approx(whole.kl, rel=1e-6) and joined.perplexity == pytest.approx(whole.perplexity)
    assert whole.entropy is None and joined.entropy is None  # asked for only (a search trial does not)


def test_entropy_is_measured_when_asked_and_combines_over_slices(tiny, reference):
    q = quality.measure(tiny.model, reference, entropy=True)
    expected = 0.0
    for window in reference.input_ids:
        logprobs = quality.log_probs(tiny.model, window[None])[0]
        expected -= float((logprobs.exp() * logprobs).sum())
    assert q.entropy == pytest.approx(expected / reference.tokens, rel=1e-5) and q.entropy > 0
    parts = [quality.measure(tiny.model, reference, slice(0, 1), entropy=True),
             quality.measure(tiny.model, reference, slice(1, None), entropy=True)]
    assert quality.combined(parts).entropy == pytest.approx(q.entropy, rel=1e-6)


def test_top_k_kl_is_exact_at_the_whole_vocabulary_and_zero_for_the_teacher(tiny, reference):
    plan = CompressionPlan(precision={x.name: LayerPrecision(3, 32) for x in stored_layers(tiny.arch)})
    model = compression.apply(plan, tiny.model, tiny.arch)
    vocab = tiny.model.config.vocab_size
    whole = quality.Reference.of_windows(tiny.model, reference.input_ids, top_k=vocab)
    assert quality.measure(model, whole).kl == pytest.approx(quality.measure(model, reference).kl, rel=1e-4)
    small = quality.Reference.of_windows(tiny.model, reference.input_ids, top_k=16)
    assert quality.measure(tiny.model, small).kl == pytest.approx(0.0, abs=1e-5)
    assert small.bytes < reference.bytes / 7  # (16 + 16) x 8 bytes against 512 x 4 per position


def test_top_k_kl_estimates_the_rest_without_bias_and_coarsening_underestimates():
    torch.manual_seed(0)
    teacher = torch.log_softmax(2 * torch.randn(128, 512), dim=-1)
    student = torch.log_softmax(teacher + 0.3 * torch.randn(128, 512), dim=-1)
    exact = float((teacher.exp() * (teacher - student)).sum())
    estimates = [quality.TopK.of(teacher, 64, seed=seed).kl(student) for seed in range(40)]
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.01)
    assert max(estimates) - min(estimates) > 0  # the draws differ by seed
    assert 0 < quality.TopK.of(teacher, 64, tail_samples=0).kl(student) < exact


def test_top_k_below_one_is_refused(tiny):
    with pytest.raises(UserError, match="top_k must be at least 1"):
        quality.Reference(tiny.model, tiny.tokenizer, text.split("pydoc").evaluation, 2, 64, top_k=0)
