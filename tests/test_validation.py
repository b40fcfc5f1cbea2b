"""Published decode speeds and the host's own validation, next to predicted latencies."""

import json

import pytest

from llmtailor import hw_profiles
from llmtailor.hw_profiles import validation


def test_every_published_figure_names_a_shipped_profile_a_known_model_and_a_source():
    entries = validation.published()
    assert len(entries) >= 6
    for e in entries:
        assert e["device"] in hw_profiles.available() and e["model"] in validation.MODELS
        assert e["source"].startswith("https://") and e["decode_tokens_per_s"] > 0 and e["excerpt"]


def test_a_check_predicts_the_published_model_with_the_profile():
    profile = hw_profiles.load("apple-m2-16gb")
    (c,) = validation.check(profile)
    assert c.model == "llama-2-7b" and c.published_tokens_per_s == pytest.approx(21.91)
    # 7B at 4.5 bits is about 3.8 GB: 100 GB/s can read it at most 26 times a second.
    assert 5 < c.predicted_tokens_per_s < 100 / 3.8
    assert c.error_percent == pytest.approx(100 * (c.predicted_tokens_per_s / 21.91 - 1))
    assert "published figure" in validation.note(profile) and "github.com" in validation.note(profile)
    assert validation.check(hw_profiles.load("t4-16gb")) == []
    assert "not checked" in validation.note(hw_profiles.load("t4-16gb"))


def test_the_host_note_reads_the_validation_benchmark(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path))
    host = hw_profiles.DeviceProfile("host", "this machine", 10**10, 10**10, 30.0, {"fp32": 0.2}, 45.0)
    assert "not yet checked" in validation.note(host)
    path = validation.host_validation_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"date": "2026-11-27", "variants": 12, "prefill_mape_percent": 31.6,
                                "decode_mape_percent": 9.8, "memory_mape_percent": 8.0, "prefill_kendall_tau": 0.6,
                                "decode_kendall_tau": 0.91}))
    note = validation.note(host)
    assert "12 variants" in note and "decode 10%" in note and "prefill 32%" in note and "0.91" in note


def test_a_budget_alone_says_whose_speeds_its_latencies_use(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMTAILOR_CACHE", str(tmp_path))
    assert "typical laptop CPU's speeds" in validation.note(hw_profiles.from_memory("8GB"))
    limited = hw_profiles.from_memory("4GB", hw_profiles.load("apple-m2-16gb"))
    assert "published figure" in validation.note(limited)
