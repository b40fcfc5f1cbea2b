"""Each shipped profile's decode prediction beside a published measurement of a 7B-8B model at about 4 bits.

    python benchmarks/bench_published.py

The published figures and their sources are `llmtailor/hw_profiles/published/decode.yaml`;
the prediction is `hw_profiles.validation.check` (the model's published shape at 4 bits in
groups of 32 with float16 scales, 128-token context, batch 1). No measurement is made
here: this compares public facts with the cost model. Writes
benchmarks/results/bench_published.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    from llmtailor import hw_profiles
    from llmtailor.hw_profiles import validation

    rows = []
    for entry in validation.published():
        profile = hw_profiles.load(entry["device"])
        for c in validation.check(profile):
            if c.source == entry["source"] and c.model == entry["model"]:
                rows.append({"device": c.device, "profile_runtime": profile.runtime, "model": c.model,
                             "quant": c.quant, "measured_runtime": c.runtime, "source": c.source,
                             "published_tokens_per_s": c.published_tokens_per_s,
                             "predicted_tokens_per_s": c.predicted_tokens_per_s, "error_percent": c.error_percent})
    errors = [abs(r["error_percent"]) for r in rows]
    results = {"date": time.strftime("%Y-%m-%d"), "devices": len(rows), "mape_percent": statistics.mean(errors),
               "median_absolute_error_percent": statistics.median(errors), "rows": rows}
    out = ROOT / "results" / "bench_published.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    lines = [f"Date: {results['date']}.", "",
             "| device | profile runtime | published: model, quant, runtime | published tokens/s | predicted | error |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['profile_runtime']} | {r['model']}, {r['quant']}, {r['measured_runtime']} | "
                     f"{r['published_tokens_per_s']:g} | {r['predicted_tokens_per_s']:.3g} | {r['error_percent']:+.0f}% |")
    lines += ["", f"Mean absolute error {results['mape_percent']:.0f}%, median "
              f"{results['median_absolute_error_percent']:.0f}%, over {len(rows)} devices."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
