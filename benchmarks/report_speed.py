"""How long the feature diff and the report take at the tiny run's scale, side by side with a bare
encode+decode pass over the same tokens (the least any analysis must do).

    .venv/bin/python benchmarks/report_speed.py           # 200k tokens, d_model 128, 4096 latents
    .venv/bin/python benchmarks/report_speed.py --quick   # 20k tokens, 1024 latents

Writes benchmarks/out/report_speed.json. The crosscoder is a randomly initialised
crossdiff.crosscoder.CrossCoder whose threshold is set for about --l0 active latents per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from crossdiff.analysis import diff_features
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.report import write_report


def make_inputs(n_tokens: int, d_model: int, d_sae: int, l0: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(d_model=d_model, d_sae=d_sae, k=l0, n_shared=d_sae // 32))
    with torch.no_grad():
        # a spread of relative norms, so every class has members
        cc.W_dec_untied.mul_(torch.rand(cc.W_dec_untied.shape[:2], generator=g)[..., None] + 0.02)
    acts = (torch.randn(n_tokens, 2, d_model, generator=g) * 3).to(torch.float16)
    with torch.no_grad():
        sample = acts[:1024].float()
        scores = cc.pre_activations(sample).relu() * cc.selection_weights()
        cc.threshold.fill_(float(scores.flatten().topk(l0 * len(sample)).values.min()))
    doc = torch.arange(n_tokens) // 200
    metadata = {
        "token_ids": torch.randint(0, 4096, (n_tokens,), generator=g),
        "doc_ids": doc,
        "positions": torch.arange(n_tokens) % 200,
        "domains": doc % 3,
        "experts": torch.randint(0, 8, (n_tokens, 2), generator=g),
    }
    return cc, acts, metadata


def bare_pass(cc, acts, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(acts), batch_size):
            x = acts[start : start + batch_size].float()
            cc.decode(cc.encode(x))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k tokens, 1024 latents")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=None)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_tokens = args.tokens or (20_000 if args.quick else 200_000)
    d_sae = args.d_sae or (1024 if args.quick else 32 * args.d_model)
    cc, acts, metadata = make_inputs(n_tokens, args.d_model, d_sae, args.l0)

    reference = bare_pass(cc, acts, args.batch_size)
    t0 = time.perf_counter()
    diff = diff_features(cc, acts, metadata=metadata, batch_size=args.batch_size)
    t_diff = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        write_report(diff, out, quiet=True)
        t_report = time.perf_counter() - t0
        html_mb = (Path(out) / "report.html").stat().st_size / 2**20
    result = {
        "n_tokens": n_tokens,
        "d_model": args.d_model,
        "d_sae": d_sae,
        "l0": diff.summary["reconstruction"]["l0"],
        "threads": torch.get_num_threads(),
        "bare_encode_decode_s": round(reference, 2),
        "diff_features_s": round(t_diff, 2),
        "write_report_s": round(t_report, 2),
        "total_s": round(t_diff + t_report, 2),
        "diff_over_bare_pass": round(t_diff / reference, 2),
        "report_html_mib": round(html_mb, 2),
        "class_counts": diff.summary["class_counts"],
        "note": "measured on a shared 2-core CPU; compare ratios, not seconds",
    }
    print(json.dumps(result, indent=2))
    out_path = Path(__file__).parent / "out" / "report_speed.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
