"""Open a finished run and inspect one latent: its class, where it fires, which experts, and its
top-activating contexts.

    python examples/inspect_latent.py runs/tiny                  # the densest MoE-only latent
    python examples/inspect_latent.py runs/tiny --latent 123      # any latent, with a fresh pass

The report's panels (report.json) hold the contexts of the latents it shows; for any other latent
`crossdiff.top_contexts` makes one streaming pass over the store. Without Python,
`crossdiff inspect runs/tiny 123` prints any live latent from the report's explorer.json (top and
activation-band examples, histogram, logit effects) with no pass at all.
"""

import argparse
import json
from pathlib import Path

import crossdiff
from crossdiff.activations import ActivationStore
from crossdiff.data import load_tokenizer


def show_context(ctx: dict) -> None:
    marked = "".join(
        f"[[{tok}]]" if i == ctx["center"] else tok for i, tok in enumerate(ctx["tokens"])
    )
    print(f"  {ctx['activation']:7.3f}  {ctx['domain']:<8} {marked!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a folder written by `crossdiff run`")
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--contexts", type=int, default=8)
    args = parser.parse_args()

    report = json.loads((args.run / "report" / "report.json").read_text())
    names = report["summary"]["model_names"]
    rows = {row["latent"]: row for row in report["latents"]}
    latent = args.latent
    if latent is None:  # the densest latent of the MoE-only class, if there is one
        b_only = f"{report['summary']['direction']['B']}-only"
        candidates = [r for r in report["latents"] if r["class"] == b_only] or report["latents"]
        latent = max(candidates, key=lambda r: r["density"])["latent"]
    row = rows[latent]
    print(f"latent {latent}: class {row['class']}, relative norm {row['relative_norm']:.3f}")
    print("  decoder norms: " + ", ".join(f"{n}={row[f'norm_{n}']:.3f}" for n in names))
    print(
        f"  fires on {row['density']:.2%} of tokens, mean activation {row['mean_activation']:.3f}"
    )
    top_layer = row.get("top_expert_layer")
    if top_layer is not None and top_layer >= 0:
        print(
            f"  top (layer, expert): L{top_layer}E{row['top_expert']}, lift "
            f"{row['top_expert_lift']:.2f}, KL to the layer's routing {row['expert_kl']:.3f} bits"
        )

    panel = report["details"].get(str(latent))
    if panel is not None:
        print("  domain shares:", {k: round(v, 3) for k, v in panel["domain_shares"].items()})
        for layer in panel.get("expert_layers") or []:
            print(f"  layer {layer['layer']} expert counts:", layer["counts"])
        contexts = panel["contexts"][: args.contexts]
    else:
        cc = crossdiff.CrossCoder.load(args.run / "crosscoder")
        store = ActivationStore(args.run / "store")
        tokenizer = load_tokenizer(args.run / "data" / "tokenizer")
        contexts = crossdiff.top_contexts(
            store, latent, cc=cc, tokenizer=tokenizer, n_contexts=args.contexts
        )
    print(f"  top {len(contexts)} contexts ([[token]] is where it fires most):")
    for ctx in contexts:
        show_context(ctx)


if __name__ == "__main__":
    main()
