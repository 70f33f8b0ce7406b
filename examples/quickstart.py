"""Quickstart: the whole pipeline on the embedded corpus, then a look at the result.

    python examples/quickstart.py                         # tiny preset, ~15 min on 2 CPU cores
    python examples/quickstart.py --preset micro --out runs/micro   # a minute: smoke test

Re-running resumes: finished stages are skipped.
"""

import argparse
from pathlib import Path

from crossdiff.run.pipeline import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    summary = run_pipeline(args.out, args.preset, device=args.device)
    diff = summary.metrics["diff"]
    recon = diff["reconstruction"]
    print(f"FVE per model ({recon['evaluated_on']} tokens):", recon["fve_per_model"])
    print("FVE pooled in normalized units:", recon["fve_pooled_normalized"])
    print("latent classes:", diff["class_counts"])
    for sentence in diff["sentences"]:
        print("-", sentence)
    print("open", summary.report_paths["html"])


if __name__ == "__main__":
    main()
