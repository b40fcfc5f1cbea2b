"""Untrusted files: no code runs from weights or YAML, every string in the report is escaped, passwords stay hidden."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest

from llmtailor import cli, models
from llmtailor.errors import UserError

FAST = ["--context", "256", "--prompt", "64", "--eval-windows", "2", "--window-tokens", "64", "--no-progress",
        "--tasks", "none"]
SCRIPT = "<script>alert(1)</script>"


def test_pickled_weights_cannot_run_code(tiny_model_dir, tmp_path):
    import torch
    from bad_inputs import PickleThatRunsCode

    folder = tmp_path / "pickled-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": PickleThatRunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds more than tensors .* refused"):
        models.load(str(folder))
    assert not marker.exists(), "loading the weights ran code"


def test_the_report_escapes_strings_from_models_files_and_users(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / f"model {SCRIPT.replace('/', '')}"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "note": SCRIPT}))
    device = tmp_path / "device.yaml"
    device.write_text(f"name: '{SCRIPT}'\ndescription: '{SCRIPT} board'\nmemory: 8GB\nusable_memory: 500kB\n"
                      "memory_bandwidth_gbps: 17\npeak_tflops: {fp32: 0.1}\npower_watts: 10\n")
    text = tmp_path / f"{SCRIPT.replace('/', '')}.txt"
    from pydoc_data.topics import topics

    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:120]))
    code = cli.main(["fit", str(model), "--device", str(device), "--trials", "2", "--study", "xss",
                     "--results", str(tmp_path / "results"), "--text", str(text), *FAST])
    assert code == 0, capsys.readouterr().err
    html = (tmp_path / "results" / "xss" / "report.html").read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)" in html  # shown, as text


def test_storage_passwords_never_appear_anywhere(tiny_model_dir, tmp_path, postgres_url, capsys):
    url = postgres_url.replace("postgres@", "postgres:s3cret@")  # the test server trusts any password
    results = tmp_path / "results"
    code = cli.main(["sweep", str(tiny_model_dir), "--memory", "500kB", "--trials", "2", "--study", "secret",
                     "--results", str(results), "--storage", url, "--space", "coarse", *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert cli.main(["report", "secret", "--results", str(results), "--storage", url]) == 0
    out2 = capsys.readouterr()
    assert "s3cret" not in out.out + out.err + out2.out + out2.err
    study = optuna.load_study(study_name="secret", storage=url)
    stored = json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id),
                         [(t.user_attrs, t.system_attrs) for t in study.trials]], default=str)
    assert "s3cret" not in stored
    for path in (results / "secret").rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path
