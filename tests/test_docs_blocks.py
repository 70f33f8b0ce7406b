"""Every ```bash and ```python block of README.md and docs/*.md runs as written, at micro size.

How the blocks run:
- All in one workspace (a temporary folder; the docs' relative paths such as runs/tiny live in it),
  document by document in DOC_ORDER (the user guide first: its `crossdiff run` builds runs/tiny,
  which later pages read), blocks in the order they appear.
- bash blocks: `bash -e BLOCK` with the shared virtualenv's bin/ (the `crossdiff` command) first
  on PATH and this checkout on PYTHONPATH.
- python blocks: the python blocks of one document run in one interpreter, one after another in
  one namespace, as a reader types them into one session.
- Only the size knobs in SIZE_KNOBS are substituted (the tiny preset's sizes -> the micro
  preset's); every other character runs as written.
- A block right after `<!-- crossdiff-docs: skip (REASON) -->` does not run; SKIPPED lists every
  such block with its reason, and test_skipped_blocks_are_the_listed_ones fails when the markers
  and the list disagree, so a reviewer sees each exception here.
- A block right after `<!-- crossdiff-docs: file NAME -->` (a TOML config, say) is written to NAME
  in the workspace before its document's blocks run, instead of being run.
- docs/api.md's signature blocks are ```text (`inspect.signature` text, not programs): each must
  parse as the signature of a function (`def SIGNATURE: ...`; a dataclass's `<factory>` default
  read as a value, `(...)`, which inspect writes for a signature it cannot read, as `(*a)`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_ORDER = ("docs/user-guide.md", "README.md")  # then the other docs/*.md by name
SIGNATURE_DOCS = ("docs/api.md",)

# (document, old text, new text): the tiny preset's sizes -> the micro preset's, nothing else
SIZE_KNOBS = (
    ("*", "--preset tiny", "--preset micro"),
    ("docs/user-guide.md", 'preset = "tiny"', 'preset = "micro"'),
    ("docs/user-guide.md", "harvest_tokens = 800000", "harvest_tokens = 12000"),
    ("docs/user-guide.md", "--tokens 400000", "--tokens 12000"),
    ("README.md", 'preset="tiny")      #', 'preset="tiny", n_chars_per_domain=150_000)  #'),
    ("README.md", '"runs/mine/models", preset="tiny")', '"runs/mine/models", preset="tiny", '
     "steps=30, eval_rows=16)"),
    ("README.md", "n_tokens=400_000", "n_tokens=12_000"),
    ("README.md", "d_sae=32 * store.d_model", "d_sae=4 * store.d_model"),
    ("README.md", "train_crosscoder(store, cfg)", "train_crosscoder(store, cfg, steps=60, "
     "batch_size=256)"),
    ("docs/data.md", 'prepare_data("runs/tiny/data")', 'prepare_data("runs/tiny/data", '
     "n_chars_per_domain=150_000)"),
    ("docs/data.md", "vocab_size=4096)", "vocab_size=512)"),
    ("docs/crosscoder.md", "steps=3000, batch_size=1024", "steps=60, batch_size=256"),
    ("docs/store.md", "n_tokens=1_000_000", "n_tokens=12_000"),
)  # fmt: skip

# (document, the start of the block's first line): why it does not run here
SKIPPED = {
    ("README.md", "# main job: corpus -> tokenizer -> dense + MoE models -> paired activations"):
        "installs a virtualenv and runs the whole test suite, this test included",
    ("docs/user-guide.md", "bash scripts/setup.sh"): "installs a virtualenv",
    ("docs/user-guide.md", "crossdiff run --preset small --model-seeds 3 --crosscoder-seeds 3"):
        "over an hour on 2 CPU cores; the same flags run at the micro size in "
        "tests/test_pipeline.py",
    ("docs/user-guide.md", "torchrun --standalone --nproc_per_node 4 -m crossdiff harvest \\"):
        "four processes on four GPUs",
    ("docs/distributed.md", "torchrun --standalone --nproc_per_node 4 -m crossdiff train-models"):
        "four processes on four GPUs at the paper size",
    ("docs/data.md", "from dataclasses import replace"):
        "streams datasets from the Hugging Face hub",
    ("docs/data.md", 'DomainSource(domain, path, name=None, split="train", column="text", '
     "data_files=None, data_dir=None)"): "a signature, not a program",
    ("docs/data.md", 'prepare_data(out_dir, *, source=None, preset="tiny", seed=0, '
     "n_chars_per_domain=None,"): "a signature, not a program",
    ("docs/models.md", 'result = crossdiff.train_language_models(train, heldout, '
     '"runs/tiny/models", preset="tiny",'):
        "trains the tiny preset's models (minutes); the README's Python block makes the same "
        "call at the micro size",
    ("docs/user-guide.md", "from crossdiff.activations import Pairing, harvest"):
        "model_a, model_b and tokens are the reader's own; examples/bring_your_own_models.py "
        "runs this end to end (tests/test_pipeline.py)",
    ("docs/benchmarks.md", "bash benchmarks/gpu_check.sh        # under 8 minutes on one H200; "
     "nothing downloaded"): "a shortened paper run on a GPU; tests/test_gpu_check.py runs it at "
     "the micro size",
    ("docs/distributed.md", "bash benchmarks/gpu_check.sh"):
        "a shortened paper run on a GPU; tests/test_gpu_check.py runs it at the micro size",
    ("README.md", "from transformer_lens.model_bridge import TransformerBridge"):
        "model_a, hf_folder and tokens are the reader's own; tests/test_any_models.py runs it as "
        "written with tiny local models",
    ("README.md", "# dense_48, moe_32: HookedTransformers of d_model 48 and 32 (e.g. "
     "crossdiff.build_model("): "dense_48, moe_32 and data are the reader's own; "
        "tests/test_widths.py runs it as written with tiny models",
    ("docs/models.md", "from transformer_lens import HookedTransformer"):
        "downloads OLMoE from the Hugging Face hub; tests/test_moe_swap.py checks the swap on "
        "random-weight OLMoE, Mixtral and GPT-OSS configs",
    ("docs/store.md", "from crossdiff.activations.live import LiveActivations"):
        "the paper's size on a GPU; tests/test_live_source.py trains from a live source at a "
        "small size",
    ("docs/store.md", "cc.fold_scaling_factors(store.scaling_factors)"):
        "cc is the reader's own crosscoder, trained on scaled activations",
}  # fmt: skip

_MARKER = re.compile(r"<!--\s*crossdiff-docs:\s*(skip|file)\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    marker: str | None  # "skip" or "file"
    argument: str  # the skip reason or the file name

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0].strip() if self.code.strip() else ""


def _unparenthesized(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if text.startswith("(") and text.endswith(")") else text


def documents() -> list[str]:
    others = sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))
    return [*DOC_ORDER, *(d for d in others if d not in DOC_ORDER)]


def blocks_of(doc: str) -> list[Block]:
    text = (REPO / doc).read_text()
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = _MARKER.fullmatch(before[-1].strip()) if before else None
        found.append(
            Block(
                doc=doc,
                line=text[: match.start()].count("\n") + 1,
                lang=match.group(1),
                code=match.group(2),
                marker=marker.group(1) if marker else None,
                argument=_unparenthesized(marker.group(2)) if marker else "",
            )
        )
    return found


def sized(block: Block) -> str:
    code = block.code
    for doc, old, new in SIZE_KNOBS:
        if doc in ("*", block.doc):
            code = code.replace(old, new)
    return code


def runnable(doc: str) -> list[Block]:
    return [b for b in blocks_of(doc) if b.lang in ("bash", "python") and b.marker is None]


def test_skipped_blocks_are_the_listed_ones():
    marked = [b for doc in documents() for b in blocks_of(doc) if b.marker == "skip"]
    listed = set(SKIPPED)
    unlisted = []
    for b in marked:
        assert b.argument, f"{b.doc}:{b.line}: a skip marker needs its reason in parentheses"
        match = [key for key in listed if key[0] == b.doc and b.first_line.startswith(key[1])]
        if match:
            listed -= set(match)
        else:
            unlisted.append(f"{b.doc}:{b.line} {b.first_line!r}")
    assert not unlisted, f"skip markers without an entry in SKIPPED: {unlisted}"
    assert not listed, f"SKIPPED entries without a marker in the docs: {sorted(listed)}"


def test_every_size_knob_matches_its_document():
    """A knob that no longer matches (the docs changed) would let a block run at full size."""
    for doc, old, _ in SIZE_KNOBS:
        docs = documents() if doc == "*" else [doc]
        used = [b for d in docs for b in blocks_of(d) if b.marker == "file"]
        used += [b for d in docs for b in runnable(d)]
        assert any(old in b.code for b in used), (doc, old)


def test_api_signatures_parse():
    """api.md's signatures are ```text blocks, so no reader pastes them as code (they are not),
    and each parses as a function signature."""
    for doc in SIGNATURE_DOCS:
        assert not [b.line for b in blocks_of(doc) if b.lang == "python"], doc
        blocks = [b for b in blocks_of(doc) if b.lang == "text"]
        assert len(blocks) > 20
        for b in blocks:
            signature = b.code.strip().replace("<factory>", "None").replace("(...)", "(*a)")
            ast.parse(f"def {signature}: ...")  # raises SyntaxError naming the problem


def _environment() -> dict[str, str]:
    venv_bin = Path(sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
    }


_SESSION = """\
import json, sys, traceback
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print(f"--- {block['where']}", flush=True)
    exec(compile(block["code"], block["where"], "exec"), namespace)
"""


def _run_document(doc: str, workspace: Path) -> None:
    for b in blocks_of(doc):
        if b.marker == "file":
            (workspace / b.argument).write_text(sized(b))
    env = _environment()
    python_blocks = []
    for b in runnable(doc):
        where = f"{doc}:{b.line}"
        if b.lang == "bash":
            script = workspace / "block.sh"
            script.write_text(sized(b))
            result = subprocess.run(
                ["bash", "-e", str(script)], cwd=workspace, env=env, capture_output=True, text=True
            )
            assert result.returncode == 0, (
                f"{where} failed:\n{sized(b)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        else:
            python_blocks.append({"where": where, "code": sized(b)})
    if python_blocks:
        (workspace / "blocks.json").write_text(json.dumps(python_blocks))
        (workspace / "session.py").write_text(_SESSION)
        result = subprocess.run(
            [sys.executable, "session.py", "blocks.json"],
            cwd=workspace, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"python blocks of {doc} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
        )


@pytest.mark.slow
def test_every_docs_block_runs_as_written(tmp_path):
    """Builds runs/tiny at the micro size through the user guide, then runs every other block."""
    for doc in documents():
        if doc not in SIGNATURE_DOCS:
            _run_document(doc, tmp_path)
    assert (tmp_path / "runs" / "tiny" / "report" / "report.html").exists()
