"""`llmtailor export`: one trial's compressed model, as a folder ``AutoModelForCausalLM.from_pretrained`` loads.

The plan is applied the way the search applied it: ``compression.apply`` in teacher-input mode (DESIGN,
"Calibration statistics and the per-layer cache"), from the calibration statistics, solved layers, cut importance
and trained students that the study's processes kept in the cache folder. What is missing there (another machine,
a cleared cache) is made again from the study's own calibration recipe, the same way. So the exported weights are
the ones the study measured. Their fidelity and perplexity are measured again on the study's evaluation text (the
same windows, the same top-k teacher reference), and task accuracy on its tasks; both the search's figures and the
new ones go into ``scores.json`` and the model card, side by side, so a difference shows instead of being assumed
away.

The weights are stored as floats (float32 unless ``dtype`` says float16 or bfloat16): each quantized weight at its
dequantized value (rounded to ``dtype``), each pruned weight at zero, a cut student at its smaller shapes. That is
what transformers loads with no quantization library.
The bytes a runtime holds once the weights are packed are the cost model's, and the card states both sizes.
With ``sequential`` the plan is instead compressed block by block (``compression.sequential``, each block
calibrated on the compressed blocks before it): the better model for GPTQ, with new scores, for plans without a
student. ``format="gguf"`` packs the codes into one GGUF file for llama.cpp instead (`gguf_file`), and what is
measured is that file as transformers reads it back. Not here yet: sequential compression of a student.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch

from llmtailor import files, models, text
from llmtailor.arch import Architecture
from llmtailor.errors import UserError
from llmtailor.evaluators import quality
from llmtailor.evaluators import tasks as lm_tasks
from llmtailor.plan import CompressionPlan
from llmtailor.report import study_info
from llmtailor.search import pareto
from llmtailor.search.study import quality_figures, status

# Studies made before their fingerprint held the window size measured on windows of this many tokens (the default).
OLD_WINDOW_TOKENS = 256
SEARCH_FIGURES = ("kl", "perplexity", "accuracy", "accuracy_ci95", "kl_by_text", "perplexity_by_text", "stage",
                  "memory_bytes", "weight_bytes", "bits_per_weight", "sparsity", "params", "decode_s_per_token",
                  "prefill_s", "energy_j_per_token", "budget_bytes", "distill_steps")


def finished_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial `number` of the study, if it finished with a measured plan; UserError naming the front otherwise."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    usable = trial is not None and trial.state == optuna.trial.TrialState.COMPLETE and "plan" in trial.user_attrs \
        and "kl" in trial.user_attrs
    if not usable:
        front = [t.number for t in pareto.front_trials(study, pareto.objectives_of(study))]
        why = "has no such trial" if trial is None else f"did not measure trial {number} ({status(trial)})"
        raise UserError(f"study {study.study_name!r} {why}: export a measured trial, such as one on the front "
                        f"({', '.join(map(str, front)) or 'none yet'})")
    return trial


FORMATS = ("hf", "gguf")
DTYPES = ("float32", "float16", "bfloat16")  # what --format hf stores the float weights as


def export(study: optuna.Study, number: int, out: Path | str, *, format: str = "hf", dtype: str = "float32",
           sequential: bool = False, torch_device: str = "cpu", trust_remote_code: bool = False,
           log: Any = print) -> dict[str, Any]:
    """Write trial `number`'s model into the new folder `out` with ``plan.json``, ``scores.json`` and a model card
    ``README.md``; return the scores record. Nothing is left at `out` when it fails.

    ``format``: ``hf``, the float weights and tokenizer that ``from_pretrained`` loads; ``gguf``, one
    ``model.gguf`` with the weights packed as `gguf_file` says (llama, qwen2 or qwen3 models with a byte-level
    BPE tokenizer, or loaded from a GGUF file). The scores are measured on what was written: for ``gguf``, the
    file as transformers reads it back.
    ``dtype``: the float type ``hf`` stores the weights in. float16 and bfloat16 halve the folder; the scores are
    then measured with the weights rounded to that type (in float32 arithmetic), so they are the stored weights'.
    ``sequential``: compress the blocks in order, each calibrated on the compressed blocks before it, instead of as
    the search did (on the teacher's inputs). For GPTQ this is the better model (BENCHMARKS.md, bench_gptq.py: on
    the default model at 4 bits g128, KL 0.24 against 0.28; at 3 bits 0.88 against 1.22), and its scores are then
    new figures, not the search's; it takes minutes (no layer comes from the cache). Plans with a student are not
    taken yet."""
    info = study_info(study)
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown weight type {dtype!r}: choose one of {', '.join(DTYPES)}")
    if format == "gguf" and dtype != "float32":
        raise UserError("--dtype sets the float weights of --format hf; --format gguf packs each layer into its own "
                        "GGUF type (16-bit layers as F16): leave --dtype out")
    trial = finished_trial(study, number)
    plan = CompressionPlan.from_dict(pareto.plan_json(trial))
    if sequential and not plan.student.is_identity:
        raise UserError(f"trial {number}'s plan cuts or distills a student, which sequential compression does not "
                        "take yet: export it without --sequential (as the search applied it)")
    if sequential and "calibration" not in info:
        raise UserError(f"study {study.study_name!r} has no calibration text (its space calibrates nothing), so "
                        "--sequential would give the same model: export it without --sequential")
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out} already exists: export writes a new folder; name another one or remove it")
    files.check_writable_folder(out.parent, "export folder")
    spec = None if info["model"] == "default" else info["model"]
    if format == "gguf":
        from llmtailor.report import gguf_file

        kind, where = models.resolve(spec)
        gguf_source = Path(where) if kind == "gguf" else None
        if gguf_source is None:  # header and tokenizer made from the model's own: checked before anything is loaded
            gguf_file.check_source(None, models.load_config(spec, trust_remote_code=trust_remote_code, log=log)[0],
                                   models.load_tokenizer(spec, trust_remote_code=trust_remote_code, log=log))
        else:
            gguf_file.check_source(gguf_source, None, None)
    device = models.torch_device(torch_device)
    teacher = models.load(spec, trust_remote_code=trust_remote_code, log=log)
    if Architecture.from_dict(info["arch"]) != teacher.arch:
        raise UserError(f"{teacher.name} is not the model study {study.study_name!r} was made for "
                        f"({info['model_name']}): its architecture differs")
    teacher.model.to(device)
    made = {} if sequential else _cached_parts(plan, teacher, info, device, log)
    forms: dict[Any, Any] = {}  # module -> its quantized weight (codes, scales, zero points), for a packed format
    if sequential:
        from llmtailor.compression import calibration
        from llmtailor.compression import sequential as sequential_mod

        log(f"compressing {teacher.name} block by block under trial {number}'s plan ...")
        windows = calibration.CalibrationSpec(**info["calibration"]).make_windows(teacher.model, teacher.tokenizer,
                                                                                  device)
        model = sequential_mod.compress_sequential(plan, teacher.model, teacher.arch, windows, device,
                                                   quantized_forms=forms)
    else:
        from llmtailor import compression

        log(f"applying trial {number}'s plan to {teacher.name} ...")
        model = compression.apply(plan, teacher.model, teacher.arch, **made, quantized_forms=forms)
    if format == "hf" and dtype != "float32":
        for parameter in model.parameters():  # buffers (rotary frequencies) are not stored: they stay as loaded
            parameter.data = parameter.data.to(getattr(torch, dtype)).float()
    record = {"study": study.study_name, "trial": number, "model": info["model_name"], "format": format,
              **({"dtype": dtype} if format == "hf" else {}),
              "device": info["device"]["name"], "calibration_text": info.get("calibration_text"),
              "evaluation_text": _evaluation_text(info),
              "compression": "sequential" if sequential else "as in the search (teacher inputs)",
              "search": {k: trial.user_attrs[k] for k in SEARCH_FIGURES if k in trial.user_attrs},
              "layers_by_bits": layers_by_bits(plan, teacher.arch)}
    students = made.get("students")
    trained = {} if students is None or students.last is None else dict(
        distill_steps=students.last.steps, trained_now=students.last.trained_now,
        train_seconds=students.last.seconds if students.last.trained_now else 0.0)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if format == "gguf":
            log("writing model.gguf ...")
            record["gguf"] = gguf_file.write(model, forms, gguf_source, staging / "model.gguf", teacher.tokenizer,
                                             teacher.name)
            overrides = gguf_file.reader_overrides(model.config)
            del model, forms
            model = gguf_file.load(staging / "model.gguf", overrides).to(device)
            log("measuring model.gguf (as transformers reads it back) on the study's evaluation text ...")
        else:
            log("measuring the exported model again on the study's evaluation text ...")
        record["export"] = {**_scores(model, teacher, info), **trained}
        if format == "hf":
            model.to("cpu").to(getattr(torch, dtype)).save_pretrained(staging)
            teacher.tokenizer.save_pretrained(staging)
        record["export"]["file_bytes"] = sum(p.stat().st_size for p in staging.iterdir()
                                             if p.suffix in (".safetensors", ".gguf"))
        files.write_text(staging / "plan.json", plan.to_json())
        files.write_text(staging / "scores.json", json.dumps(record, indent=1))
        files.write_text(staging / "README.md", model_card(plan, record))
        files.usual_modes(staging)
        os.rename(staging, out)  # (fails, and nothing is replaced, if something was made at `out` meanwhile)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _cached_parts(plan: CompressionPlan, teacher: Any, info: dict[str, Any], device: Any, log: Any) -> dict[str, Any]:
    """What `compression.apply` needs besides the teacher, for a study of a calibrated space: the statistics, the
    layer cache, and (a plan that cuts or distills) the cut importance and the trained students, under the cache
    keys the search used."""
    if "calibration" not in info:
        return {}
    from llmtailor.compression import calibration, structure, trained
    from llmtailor.search import calibrated

    spec = calibration.CalibrationSpec(**info["calibration"])
    log(f"calibration: {spec.describe()} (from the cache where the study kept it)")
    stats, key, cache, windows = calibrated.statistics_and_cache(teacher.model, teacher.tokenizer, teacher.arch, spec,
                                                                 device)
    made: dict[str, Any] = {"calibration": stats, "cache": cache}
    student = plan.student
    if student.layers is not None or student.heads or student.mlp_width:
        made["importance"] = structure.load_or_measure(teacher.model, teacher.arch, stats, windows, key,
                                                       models.cache_dir())
    if student.distillation.steps:
        made["students"] = trained.TrainedStudents(teacher.model, windows, key, models.cache_dir(), device)
    return made


def _evaluation_windows(info: dict[str, Any]) -> tuple[int, int]:
    """(windows, tokens per window) the study measured on."""
    if "window_tokens" in info:
        return info["eval_windows"], info["window_tokens"]
    return max(1, info["eval_tokens"] // OLD_WINDOW_TOKENS), OLD_WINDOW_TOKENS


def _evaluation_text(info: dict[str, Any]) -> str:
    windows, tokens = _evaluation_windows(info)
    sources = info.get("eval_texts") or [info["text"]]
    return f"{', '.join(sources)} evaluation split, {windows} x {tokens} tokens"


def _scores(model: Any, teacher: Any, info: dict[str, Any]) -> dict[str, Any]:
    """KL to the teacher and perplexity on every evaluation window of every text (the mean over texts, or the
    study's named one), and the tasks' accuracy if the study measured any."""
    windows, tokens = _evaluation_windows(info)
    sources = info.get("eval_texts") or [info["text"]]
    by_text = {}
    for source in sources:
        reference = quality.Reference(teacher.model, teacher.tokenizer, text.split(source).evaluation, windows, tokens,
                                      quality.SEARCH_TOP_K)
        by_text[source] = quality.measure(model, reference)
    scores = quality_figures(by_text, info.get("quality_text"))
    if info.get("tasks"):
        tasks = lm_tasks.resolve_tasks(list(info["tasks"]), text.split(info["text"]).task, info["task_items"],
                                       models.cache_dir())
        scores.update(lm_tasks.accuracy_summary(lm_tasks.item_scores(model, teacher.tokenizer, tasks)))
    return scores


def layers_by_bits(plan: CompressionPlan, arch: Architecture) -> dict[str, int]:
    """How many of the model's weight matrices (those of the blocks a student keeps, the embedding and the head)
    have each weight width, widest first."""
    from llmtailor.evaluators.cost import stored_layers

    kept = set(range(arch.num_layers) if plan.student.layers is None else plan.student.layers)
    counts: dict[int, int] = {}
    for lin in stored_layers(arch):
        if lin.block is None or lin.block in kept:
            bits = plan.precision_of(lin.name).bits
            counts[bits] = counts.get(bits, 0) + 1
    return {str(bits): counts[bits] for bits in sorted(counts, reverse=True)}


def _figure(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def model_card(plan: CompressionPlan, record: dict[str, Any]) -> str:
    """The folder's README.md: what was done to the model, and its scores in the search and measured again."""
    search, now = record["search"], record["export"]
    student = plan.student
    bits = ", ".join(f"{count} at {width}" for width, count in record["layers_by_bits"].items())
    methods = sorted({p.method for p in plan.precision.values() if p.bits < 16})
    share = "–" if search.get("sparsity") is None else f"{search['sparsity']:.0%}"
    sparse = sorted({f"{s.method} {s.pattern}" for s in plan.sparsity.values() if not s.is_identity})
    done = [
        f"- student: {'the teacher whole' if student.layers is None else f'{len(student.layers)} blocks kept'}"
        + (f", heads per block {sorted(set(student.heads.values()))}" if student.heads else "")
        + (f", MLP width {sorted(set(student.mlp_width.values()))}" if student.mlp_width else "")
        + (f"; distilled {student.distillation.steps} steps" if student.distillation.steps else ""),
        f"- sparsity: {share} of the linear weights"
        + (f" ({', '.join(sparse)})" if sparse else ""),
        f"- precision: {_figure(search.get('bits_per_weight'), 3)} bits per weight; weight matrices by bits: {bits}"
        + (f" ({', '.join(methods)})" if methods else ""),
        "- calibration text: none (no calibrated method)" if record["calibration_text"] is None else
        f"- calibration text: {record['calibration_text']}; compressed "
        + ("block by block, each block calibrated on the compressed blocks before it" if record["compression"] ==
           "sequential" else "as the search did, every layer calibrated on the teacher's inputs"),
    ]
    rows = [("KL to the teacher (nats/token)", "kl"), ("perplexity", "perplexity"), ("task accuracy", "accuracy"),
            ("accuracy 95% half-width", "accuracy_ci95")]
    table = "\n".join(f"| {label} | {_figure(search.get(key))} | {_figure(now.get(key))} |" for label, key in rows
                      if key in search or key in now)
    memory = search.get("memory_bytes")
    sliced = (" The search stopped this plan after its first windows (it was far behind the front there), so its "
              "figures are of those windows alone." if search.get("stage") == "kl_slice" else "")
    predicted = (f"the cost model puts the model at {_figure(memory / 1e6 if memory else None)} MB in memory (weights "
                 f"{_figure(search['weight_bytes'] / 1e6 if 'weight_bytes' in search else None)} MB)")
    if record["format"] == "gguf":
        made = record["gguf"]
        load = ("Run `model.gguf` with llama.cpp (`llama-cli -m model.gguf`), or load it with\n"
                "`AutoModelForCausalLM.from_pretrained(this_folder, gguf_file=\"model.gguf\")` (transformers dequantizes it).")
        size = (f"`model.gguf` holds {now['file_bytes'] / 1e6:,.1f} MB; its tensors by GGUF type: "
                + ", ".join(f"{count} {kind}" for kind, count in made["types"].items())
                + (f"; quantized again into Q8_0 (asymmetric 8 bits has no GGUF type of its own): "
                   f"{len(made['requantized'])} layers" if made["requantized"] else "")
                + f". For the plan's own packing {predicted}. Its scores above are of the file as transformers reads it.")
    else:
        load = ("Load it with `AutoModelForCausalLM.from_pretrained(this_folder)`; no quantization library is "
                "needed.")
        size = (f"The weights are stored as {record.get('dtype', 'float32')} ({now['file_bytes'] / 1e6:,.1f} MB of "
                f"safetensors; the scores above are of these stored values): quantized "
                f"weights at their dequantized values, pruned weights at zero. Packed for a runtime with the kernels "
                f"the device profile names, {predicted}.")
    return f"""# {record['model']}, compressed by llmtailor

Trial {record['trial']} of study `{record['study']}`, for the device `{record['device']}`. {load}
`plan.json` is the plan applied, `scores.json` the figures below.

## What was done

{chr(10).join(done)}

## Scores

Measured on {record['evaluation_text']} (held out from the calibration text).{sliced}

| | in the search | measured again on this export |
|---|---:|---:|
{table}

## Size

{size}
"""
