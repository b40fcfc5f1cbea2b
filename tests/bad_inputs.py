"""Every kind of bad input a user can give, with the one-line message each must get.

Shared by the test that holds them (test_errors.py) and by the script that lists
them in benchmarks/BENCHMARKS.md (benchmarks/bad_inputs.py). Placeholders in argv:
{model} the tiny model folder, {in} the folder of input files made by make_inputs.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path


class PickleThatRunsCode:
    """Unpickling this runs a shell command (it touches a marker file); a safe loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


SMALL_TEXT = "\n\n".join(f"Paragraph {i} has a few words of prose in it." for i in range(8))


def make_inputs(folder: Path, model_dir: Path) -> Path:
    """Write the bad input files (device YAMLs, broken GGUFs, odd model folders, short text) into folder."""
    import gguf
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    good = (
        "name: board\ndescription: a test board\nmemory: 8GB\nusable_memory: 6GB\nmemory_bandwidth_gbps: 17\n"
        "peak_tflops: {fp32: 0.1}\npower_watts: 10\n"
    )
    yamls = {
        "missing-field.yaml": good.replace("power_watts: 10\n", ""),
        "negative-bandwidth.yaml": good.replace("memory_bandwidth_gbps: 17", "memory_bandwidth_gbps: -17"),
        "wrong-type.yaml": good.replace("power_watts: 10", "power_watts: lots"),
        "unknown-key.yaml": good + "colour: red\n",
        "unsafe-tag.yaml": good + "kernels: !!python/object/apply:os.system ['touch pwned']\n",
        "not-a-mapping.yaml": "- just\n- a list\n",
    }
    for name, text in yamls.items():
        (folder / name).write_text(text)
    (folder / "notes.txt").write_text("not a model")
    (folder / "space-unknown-key.yaml").write_text("preset: prune\ncolour: red\n")
    import json

    from llmtailor import text

    # A source that holds pydoc's evaluation documents, reformatted (an exact copy would land in the same split):
    # calibrating on it would score what was fitted.
    with (folder / "pydoc-copy.jsonl").open("w") as out:
        for document in text.split("pydoc").evaluation:
            out.write(json.dumps({"text": document.replace("\n", " \n")}) + "\n")
    (folder / "short.txt").write_text(SMALL_TEXT)
    (folder / "empty-model").mkdir(exist_ok=True)
    (folder / "not-gguf.gguf").write_bytes(b"this is not a GGUF file at all" * 10)
    writer = gguf.GGUFWriter(str(folder / "whole.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # A whole GGUF file of an architecture transformers cannot convert (refused before converting).
    foreign = gguf.GGUFWriter(str(folder / "foreign.gguf"), "nosucharch")
    foreign.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    foreign.write_header_to_file()
    foreign.write_kv_data_to_file()
    foreign.write_tensors_to_file()
    foreign.close()
    # A llama file whose rope scaling (yarn) transformers' reader would drop and the conversion cannot restore.
    yarn = gguf.GGUFWriter(str(folder / "yarn.gguf"), "llama")
    yarn.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    yarn.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    yarn.write_header_to_file()
    yarn.write_kv_data_to_file()
    yarn.write_tensors_to_file()
    yarn.close()
    whole = (folder / "whole.gguf").read_bytes()
    (folder / "truncated.gguf").write_bytes(whole[: len(whole) - 4000])
    (folder / "whole.gguf").unlink()
    remote = folder / "remote-code-model"
    remote.mkdir(exist_ok=True)
    config = (model_dir / "config.json").read_text()
    (remote / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "custom-llama",\n'
                                        '  "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}'))
    (remote / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    pickled = folder / "pickled-model"
    pickled.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((model_dir / name).read_bytes())
    truncated = folder / "truncated-weights"
    truncated.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((model_dir / name).read_bytes())
    weights = (model_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (folder / "other-model-plan.json").write_text('{"precision": {"model.layers.99.mlp.up_proj": {"bits": 4}}}')
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="foreign", storage=f"sqlite:///{folder / 'foreign.db'}", load_if_exists=True)
    torch.save({"model.embed_tokens.weight": PickleThatRunsCode(folder / "pwned")}, pickled / "pytorch_model.bin")
    return folder


FIT = ["fit", "{model}", "--memory", "8GB"]
ESTIMATE = ["estimate", "{model}", "--memory", "8GB"]
# (id, argv, the message the one line must match). Every case must exit 2 and write nothing.
CASES: list[tuple[str, list[str], str]] = [
    ("results folder cannot be created (/proc)", [*FIT, "--results", "/proc/forbidden"],
     r"cannot write the results folder /proc/forbidden: creating a folder in /proc fails"),
    ("results folder under a file", [*FIT, "--results", "/etc/hostname/x"],
     r"cannot create the results folder /etc/hostname/x: /etc/hostname is a file"),
    ("text source missing", [*FIT, "--text", "/nonexistent.txt"], r"text source '/nonexistent.txt' is neither"),
    ("text too short for one evaluation window", [*FIT, "--text", "{in}/short.txt", "--tasks", "none",
                                                   "--window-tokens", "512"],
     r"evaluation text has \d+ tokens; one window needs 512"),
    ("corrupt .gguf", ["fit", "{in}/not-gguf.gguf", "--memory", "8GB"], r"not-gguf.gguf is truncated or not a valid GGUF"),
    ("truncated .gguf", ["fit", "{in}/truncated.gguf", "--memory", "8GB"], r"truncated.gguf is truncated or not a valid GGUF"),
    (".gguf of an architecture transformers cannot convert", ["fit", "{in}/foreign.gguf", "--memory", "8GB"],
     r"foreign.gguf holds a 'nosucharch' model, which transformers .* cannot convert from GGUF \(it reads llama,"),
    (".gguf whose rope scaling the conversion cannot restore", ["fit", "{in}/yarn.gguf", "--memory", "8GB"],
     r"this GGUF file's rope scaling 'yarn' is not one this tool can hand to transformers"),
    ("negative budget, separate value", ["fit", "{model}", "--memory", "-5GB"], r"malformed memory budget '-5GB'"),
    ("negative budget, joined value", ["fit", "{model}", "--memory=-5GB"], r"malformed memory budget '-5GB'"),
    ("storage driver not installed", [*FIT, "--storage", "mysql://x"],
     r"needs the Python package 'mysqlclient' .*pip install mysqlclient"),
    ("storage URL malformed", [*FIT, "--storage", "not a url"], r"malformed storage URL"),
    ("storage URL of an unknown database", ["sweep", "{model}", "--memory", "8GB", "--storage", "nosuchdb://x"],
     r"malformed storage URL 'nosuchdb://x'"),
    ("storage unreachable", ["sweep", "{model}", "--memory", "8GB", "--storage",
                             "postgresql+psycopg2://alice:s3cret@127.0.0.1:1/db"],
     r"cannot open storage postgresql\+psycopg2://alice:\*\*\*@127.0.0.1:1/db"),
    ("storage holds a study of that name not made by llmtailor",
     [*FIT, "--study", "foreign", "--storage", "sqlite:///{in}/foreign.db"], r"study 'foreign' in sqlite:///.* was not made by llmtailor"),
    ("model path missing", ["fit", "./no/such/model", "--memory", "8GB"], r"model path ./no/such/model does not exist"),
    ("file that is not a model", ["fit", "{in}/notes.txt", "--memory", "8GB"], r"is a file but not a .gguf model"),
    ("folder that is not a model", ["fit", "{in}/empty-model", "--memory", "8GB"], r"has no config.json"),
    ("hub id with no network and no cache", ["fit", "no-such-org/no-such-model", "--memory", "8GB"],
     r"could not load model 'no-such-org/no-such-model': .*offline, or not in the Hugging Face cache"),
    ("model with its own code, no --trust-remote-code", ["fit", "{in}/remote-code-model", "--memory", "8GB"],
     r"ships its own code.*--trust-remote-code"),
    ("weights pickled with code in them", ["fit", "{in}/pickled-model", "--memory", "8GB", "--tasks", "none",
                                           "--window-tokens", "16"],
     r"weights file holds more than tensors .* refused"),
    ("weights file truncated", ["fit", "{in}/truncated-weights", "--memory", "8GB"],
     r"model.safetensors is truncated or damaged"),
    ("unknown device", ["fit", "{model}", "--device", "toaster"], r"unknown device 'toaster'"),
    ("unknown cache kind to clear", ["cache", "--clear", "layers", "nosuch"],
     r"no cache kind 'nosuch': the kinds are gguf, tasks, .*students"),
    ("device YAML missing a field", ["fit", "{model}", "--device", "{in}/missing-field.yaml"],
     r"missing field\(s\) \['power_watts'\]"),
    ("device YAML negative bandwidth", ["fit", "{model}", "--device", "{in}/negative-bandwidth.yaml"],
     r"memory_bandwidth_gbps must be a non-negative number"),
    ("device YAML wrong type", ["fit", "{model}", "--device", "{in}/wrong-type.yaml"], r"power_watts must be a .*number"),
    ("device YAML unknown key", ["fit", "{model}", "--device", "{in}/unknown-key.yaml"], r"unknown field\(s\) \['colour'\]"),
    ("device YAML with a Python tag", ["fit", "{model}", "--device", "{in}/unsafe-tag.yaml"], r"is not valid YAML"),
    ("device YAML not a mapping", ["fit", "{model}", "--device", "{in}/not-a-mapping.yaml"], r"must be a YAML mapping"),
    ("no target", ["fit", "{model}"], r"give a target"),
    ("budget malformed", ["fit", "{model}", "--memory", "eight gigs"], r"malformed memory budget"),
    ("budget zero", ["fit", "{model}", "--memory", "0GB"], r"memory budget must be more than zero"),
    ("budget below the smallest plan", ["fit", "{model}", "--memory", "300kB"], r"cannot fit .* smallest plan .* needs"),
    ("unknown task", [*FIT, "--tasks", "no_such_task_xyz"], r"unknown lm-eval task"),
    ("accuracy objective without tasks", [*FIT, "--tasks", "none", "--objectives", "accuracy,memory"],
     r"accuracy objective needs lm-eval tasks"),
    ("unknown objective", [*FIT, "--objectives", "kl,beauty"], r"unknown objective"),
    ("unknown space", [*FIT, "--space", "everything"], r"unknown search space"),
    ("unknown sampler", [*FIT, "--sampler", "astrology"], r"unknown sampler 'astrology'"),
    ("space file with an unknown key", [*FIT, "--space", "{in}/space-unknown-key.yaml"],
     r"space file .*: unknown key\(s\) colour"),
    ("space file missing", [*FIT, "--space", "{in}/no-such-space.yaml"], r"space file .* does not exist"),
    ("evaluation text named twice", [*FIT, "--eval-text", "pydoc", "pydoc"], r"--eval-text names a source twice"),
    ("quality text not evaluated", [*FIT, "--eval-text", "pydoc", "--quality-text", "{in}/short.txt"],
     r"--quality-text .* is not among the evaluation texts"),
    ("calibration text that is evaluation text", [*FIT, "--space", "direct", "--calibration", "{in}/pydoc-copy.jsonl"],
     r"the calibration text .* and the evaluation text pydoc share \d+ documents"),
    ("torch device that is not one", [*FIT, "--torch-device", "gpu"], r"--torch-device 'gpu' is not a torch device"),
    ("torch device this machine lacks", [*FIT, "--torch-device", "cuda:99"], r"--torch-device cuda:99: this machine has"),
    ("calibration text missing", [*FIT, "--space", "guided", "--calibration", "/nonexistent.txt"],
     r"text source '/nonexistent.txt' is neither"),
    ("calibration text too short for one window", [*FIT, "--space", "direct", "--calibration", "{in}/short.txt"],
     r"the calibration text has \d+ tokens; one calibration window needs 512"),
    ("zero calibration windows", [*FIT, "--space", "guided", "--calibration-windows", "0"],
     r"--calibration-windows must be at least 1"),
    ("zero trials", [*FIT, "--trials", "0"], r"--trials must be at least 1"),
    ("quality floor not a number", [*FIT, "--max-kl", "low"], r"--max-kl must be a number of nats per token or none"),
    ("quality floor zero", [*FIT, "--max-kl", "0"], r"--max-kl must be a positive number of nats per token"),
    ("quality floor negative", [*FIT, "--max-kl", "-0.5"], r"--max-kl must be a positive number of nats per token"),
    ("quality floor infinite", [*FIT, "--max-kl", "inf"], r"--max-kl must be a positive number of nats per token"),
    ("zero context", [*FIT, "--context", "0"], r"--context must be at least 1"),
    ("study name with odd characters", [*FIT, "--study", "My Study!"], r"study name 'My Study!' may hold only"),
    ("unknown option", [*FIT, "--frobnicate"], r"unrecognized arguments: --frobnicate"),
    ("report of a study that does not exist", ["report", "nothing-here"], r"no study 'nothing-here'"),
    ("export of a study that does not exist", ["export", "nothing-here", "--trial", "0", "out"],
     r"no study 'nothing-here'"),
    ("export without a trial number", ["export", "nothing-here", "out"], r"the following arguments are required: "
     r"--trial"),
    ("estimate: a plan file and a uniform plan", [*ESTIMATE, "--plan", "{in}/other-model-plan.json", "--bits", "4"],
     r"give either --plan FILE or a uniform plan"),
    ("estimate: plan file missing", [*ESTIMATE, "--plan", "/nonexistent/plan.json"],
     r"cannot read plan file /nonexistent/plan.json"),
    ("estimate: plan file not JSON", [*ESTIMATE, "--plan", "{in}/notes.txt"], r"notes.txt is not a valid plan: plan is "
     r"not valid JSON"),
    ("estimate: plan of another model", [*ESTIMATE, "--plan", "{in}/other-model-plan.json"],
     r"is not a plan for .*model.layers.99.mlp.up_proj"),
    ("estimate: bits not offered", [*ESTIMATE, "--bits", "5"], r"weight bits must be one of"),
    ("estimate: N:M with N >= M", [*ESTIMATE, "--pattern", "4:2"], r"sparsity pattern must be 'unstructured' or 'N:M'"),
    ("estimate: no target", ["estimate", "{model}"], r"give a target"),
    ("host device before calibration", ["estimate", "{model}", "--device", "host"],
     r"no host profile yet: measure it with `llmtailor devices --calibrate`"),
    ("estimate: zero context", [*ESTIMATE, "--context", "0"], r"--context must be at least 1"),
]


def run_case(argv: list[str], model_dir: Path, inputs: Path, workdir: Path) -> tuple[int, str, str]:
    """Run one command in workdir (results go to workdir/results unless the case names a folder): code, out, err."""
    from llmtailor import cli

    argv = [a.replace("{model}", str(model_dir)).replace("{in}", str(inputs)) for a in argv]
    if argv[0] in ("fit", "sweep") and "--results" not in argv:
        argv += ["--results", str(workdir / "results")]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()
