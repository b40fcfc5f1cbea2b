"""One trial of a default-model study exported each way: the float folder (float32, bfloat16) and the packed GGUF file.

For each format: the seconds `export` takes (teacher loaded, plan applied from the study's caches, scores measured
again, files written), the bytes written, and KL and perplexity measured again against the search's figures on the
study's evaluation text. Where the optional llama-cpp-python is installed, the GGUF file is also run by llama.cpp:
its perplexity on the study's evaluation windows against the same file read by transformers.

    python benchmarks/bench_export.py --storage sqlite:///RESULTS/STUDY/study.db --study STUDY --trial N

Writes benchmarks/results/bench_export.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from llmtailor import models, text  # noqa: E402
from llmtailor.evaluators import quality  # noqa: E402
from llmtailor.report import export, gguf_file, study_info  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "bench_export.json"


def perplexity_by_llamacpp(path: Path, windows: torch.Tensor) -> float | None:
    """llama.cpp's perplexity of the file on the windows (each run from its first token), None without llama-cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], logits_all=True, n_threads=2, verbose=False)
    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.tensor(llm.scores[: len(window)], dtype=torch.float32)
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def perplexity_by_transformers(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--trial", type=int, required=True)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    trial = study.trials[args.trial]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt, dtype in (("hf", "float32"), ("hf", "bfloat16"), ("gguf", "float32")):
            started = time.perf_counter()
            record = export.export(study, args.trial, Path(folder) / f"{fmt}-{dtype}", format=fmt, dtype=dtype,
                                   log=lambda line: None)
            rows.append({"format": fmt if fmt == "gguf" else f"{fmt} {dtype}", "seconds": round(time.perf_counter() - started, 1),
                         "file_mb": round(record["export"]["file_bytes"] / 1e6, 1),
                         "kl_search": trial.user_attrs["kl"], "kl_export": record["export"]["kl"],
                         "perplexity_search": trial.user_attrs["perplexity"],
                         "perplexity_export": record["export"]["perplexity"],
                         "gguf_types": record.get("gguf", {}).get("types"),
                         "requantized_layers": len(record.get("gguf", {}).get("requantized", []))})
        info = study_info(study)
        loaded = models.load(None if info["model"] == "default" else info["model"], log=lambda line: None)
        ids = quality.evaluation_ids(loaded.tokenizer, text.split(info["text"]).evaluation, 256)
        windows = ids[: ids.numel() // 256 * 256].reshape(-1, 256)[:4]
        path = Path(folder) / "gguf-float32" / "model.gguf"
        by_llamacpp = perplexity_by_llamacpp(path, windows)
        by_transformers = perplexity_by_transformers(gguf_file.load(path), windows)
        # The same two readers on the model's own GGUF file (made by llama.cpp's tools): how far apart they are on
        # a file this project did not write.
        source = Path(models.resolve(None if info["model"] == "default" else info["model"])[1])
        source_llamacpp = perplexity_by_llamacpp(source, windows)
        source_transformers = perplexity_by_transformers(loaded.model, windows)
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}", "study": args.study, "trial": args.trial, "evaluation": export._evaluation_text(
              info), "rows": rows, "gguf_perplexity_first_4x256_llamacpp": by_llamacpp,
              "gguf_perplexity_first_4x256_transformers": by_transformers,
              "source_gguf_perplexity_first_4x256_llamacpp": source_llamacpp,
              "source_gguf_perplexity_first_4x256_transformers": source_transformers}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print("| format | seconds | file (MB) | KL search | KL export | perplexity search | perplexity export |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['seconds']} | {r['file_mb']} | {r['kl_search']:.4f} | {r['kl_export']:.4f} | "
              f"{r['perplexity_search']:.3f} | {r['perplexity_export']:.3f} |")
    print(f"\nmodel.gguf on the first 4 x 256 evaluation tokens: perplexity {by_transformers:.3f} read by transformers, "
          + ("llama.cpp not installed" if by_llamacpp is None else f"{by_llamacpp:.3f} run by llama.cpp"))
    print(f"the model's own GGUF file, the same windows: {source_transformers:.3f} read by transformers, "
          + ("llama.cpp not installed" if source_llamacpp is None else f"{source_llamacpp:.3f} run by llama.cpp"))


if __name__ == "__main__":
    main()
