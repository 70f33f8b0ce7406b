"""The lines `crossdiff run` prints at its end: each stage's time, the reconstruction, the classes,
the claims, the seeds' spread and the controls, the spliced-in loss."""

from __future__ import annotations

from typing import Any


def _print_summary(summary: Any) -> None:
    diff = summary.metrics.get("diff", {})
    print("\n=== crossdiff run summary ===")
    width = max((len(name) for name in summary.stage_seconds), default=0)
    for name, seconds in summary.stage_seconds.items():
        note = " (skipped: done earlier)" if name in summary.skipped else ""
        print(f"  {name:<{width}} {seconds:8.1f} s{note}")
    for line in _summary_lines(diff):
        print(f"  {line}")
    if "html" in summary.report_paths:
        print(f"  report: {summary.report_paths['html']}")


def _summary_lines(diff: dict[str, Any]) -> list[str]:
    lines = []
    recon = diff.get("reconstruction", {})
    if recon.get("fve_per_model"):
        per_model = ", ".join(f"{n}={v:.3f}" for n, v in recon["fve_per_model"].items())
        where = recon.get("evaluated_on", "analysed")
        pooled = recon.get("fve_pooled_normalized")
        pooled_text = f", pooled normalized {pooled:.3f}" if pooled is not None else ""
        lines.append(
            f"FVE per model on {diff.get('n_tokens')} {where} tokens: {per_model} "
            f"(overall raw {recon['fve']:.3f}{pooled_text})"
        )
    if recon.get("fve_topk_per_model"):
        per_model = ", ".join(f"{n}={v:.3f}" for n, v in recon["fve_topk_per_model"].items())
        lines.append(
            f"FVE with BatchTopK at k={recon['k']:g}: {per_model} (overall {recon['fve_topk']:.3f})"
        )
    if "l0" in recon:
        topk = f" (top-k: {recon['l0_topk']:.1f})" if recon.get("l0_topk") is not None else ""
        lines.append(f"L0: {recon['l0']:.1f}{topk}; dead fraction: {recon['dead_fraction']:.3f}")
    if diff.get("class_counts"):
        lines.append("classes: " + ", ".join(f"{k}={v}" for k, v in diff["class_counts"].items()))
    for claim in diff.get("claims", []):
        lines.append(f"claim: {claim['sentence']}")
        if claim.get("excluding_artifacts"):
            lines.append(f"  {claim['excluding_artifacts']['sentence']}")
    lines.extend(f"WARNING: {warning}" for warning in diff.get("warnings", []))
    lines.extend(_replication_lines(diff))
    from crossdiff.crosscoder.spliced_loss import summary_lines as spliced_loss_lines

    lines.extend(spliced_loss_lines(diff.get("spliced_loss")))
    return lines


def _replication_lines(diff: dict[str, Any]) -> list[str]:
    """The crosscoder seeds' spread and stability, and the claims over model seeds."""
    lines = []
    replicates = diff.get("replicates")
    if replicates and replicates.get("n_seeds", 1) > 1:
        counts = replicates["figures"]["class_counts"]
        spread = ", ".join(
            f"{cls}={c['mean']:.1f}±{c['sd']:.1f}" for cls, c in counts.items() if c["mean"]
        )
        lines.append(f"over {replicates['n_seeds']} crosscoder seeds (mean±sd): {spread}")
        st = replicates.get("seed_stability")
        if st:
            share = st["share_matched"].get("0.7", {}).get("all", {}).get("mean")
            lines.append(
                f"seed stability: {st['n_stable']['all']} of {st['n_live']['all']} live latents "
                f"stable; {share:.0%} matched at cosine >= 0.7"
            )
    arch = diff.get("architectures")
    if arch:
        lines.extend(arch["headline"])
        n = arch["n_model_seeds"]
        for name, split in arch["splits"].items():
            for c in split["claims"]:
                reason = f" ({c['reason']})" if c["reason"] else ""
                lines.append(f"over {n} model seeds, {name}: {c['claim']}: {c['verdict']}{reason}")
    return lines
