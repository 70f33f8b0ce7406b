"""Replicate the seed paper's set-up (arXiv 2603.05805) on a GPU.

5-layer dense and MoE models (d_model 768, 8 experts, top-2, equal active parameters) trained on one
third each of arXiv text, code and SimpleStories streamed from the Hugging Face hub, the residual
stream after the third block harvested, a BatchTopK crosscoder (32x expansion, k=300, shared-penalty
ratio 0.7) trained on it, and the report written. See docs/user-guide.md for the expected memory and
time per stage.

    python examples/paper_replication.py --out runs/paper --device cuda

Needs a CUDA GPU and network access to the hub (or the datasets in the local HF cache).
"""

import argparse
from pathlib import Path

import torch

from crossdiff.run.pipeline import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU; run examples/quickstart.py on a CPU")
    summary = run_pipeline(args.out, "paper", device=args.device)
    print("report:", summary.report_paths["html"])


if __name__ == "__main__":
    main()
