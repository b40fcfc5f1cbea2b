"""Peak memory of a sweep on a model with a 262k-token vocabulary, against its float32 size.

Where the vocabulary is large the teacher's reference distributions would be as large as
the model (268 MB per 256-token window at 262,144 tokens) and the embedding is most of
the weights. This builds a random LLaMA shaped like Gemma 3 270M where it matters
(vocabulary 262,144, width 640, 18 blocks, tied embedding; about 268M parameters, 170M
of them the embedding), saves it with the default model's tokenizer, runs a short
`llmtailor sweep` on it in a fresh process (GPTQ per group of layers, the `quant`
preset, `--tasks none`, 8 calibration windows so that it takes minutes), and reads the
peak resident memory (VmHWM) every trial recorded.

    python benchmarks/bench_big_vocab.py [--trials 6]

Writes benchmarks/results/bench_big_vocab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_big_vocab.json"


def save_model(folder: Path) -> int:
    """The random 262k-vocabulary model and the default tokenizer in `folder`; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtailor import models

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    models.load_tokenizer(None).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "big-vocab"
        params = save_model(folder)
        command = [str(Path(sys.executable).parent / "llmtailor"), "sweep", str(folder), "--memory", "2GB",
                   "--trials", str(args.trials), "--study", "big", "--results", tmp, "--tasks", "none",
                   "--space", "quant", "--calibration-windows", "8", "--no-progress"]
        env = {**os.environ, "LLMTAILOR_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name="big", storage=f"sqlite:///{Path(tmp) / 'big' / 'study.db'}")
        measured = [t for t in study.trials if t.user_attrs.get("status") == "evaluated"]
    peak = max(t.user_attrs["peak_rss_bytes"] for t in measured)
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "command": " ".join(command[1:]).replace(tmp, "TMP"), "params": params, "vocabulary": 262144,
              "float32_bytes": 4 * params, "measured_trials": len(measured), "seconds": seconds,
              "peak_rss_bytes": peak, "peak_over_float32": peak / (4 * params),
              "rss_after_each_trial_bytes": [t.user_attrs["rss_bytes"] for t in measured],
              "peak_after_each_trial_bytes": [t.user_attrs["peak_rss_bytes"] for t in measured]}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
