"""report.html's bulky data outside the page: the explorer's per-latent examples (always) and the
latent table's rows (when they are large) in report_files/, next to report.html.

Each sidecar file is JavaScript that calls one registration function the page defines:

    crossdiffLoad({"kind": "explorer", "shard": 3, "latents": {"192": {...}, ...},
                   "vocab": {"17": " the", ...}});
    crossdiffLoad({"kind": "rows", "rows": [[0, "shared", 0.51, ...], ...]});

so the page loads a shard with a <script src> tag when one of its latents is opened (fetch() of a
local file is blocked from file://, a script tag is not: the page works without a server). An
explorer shard holds `EXPLORER_SHARD` consecutive explored latents (in latent-id order) and the
text of every token its examples use; the page's index (an inline JSON block) lists the explored
ids and the shard files. A latent's entry is explorer.json's entry as it is, whatever its fields.

Every JSON text that goes into the page or a sidecar passes through `script_json`, which escapes
`<`, `>`, `&`, U+2028 and U+2029, so no token text (`<!--`, `<script>`, `</script>`, `]]>`) can
end or change a <script> element.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from crossdiff.analysis.explorer import VISIBLE_WHITESPACE
from crossdiff.plumbing.common import FILE_MODE, CrossdiffError

SIDECAR_DIR = "report_files"  # next to report.html
EXPLORER_SHARD = 64  # explored latents per shard file
ROWS_INLINE_MAX = 1_000_000  # characters of table JSON kept inside the page; more go to rows.js
REGISTER = "crossdiffLoad"

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
            "\u2029": "\\u2029"}  # fmt: skip
_UNSAFE = re.compile("[<>&\u2028\u2029]")


def script_json(obj: Any) -> str:
    """Compact JSON that is safe inside a <script> element and as a JavaScript expression."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return _UNSAFE.sub(lambda m: _ESCAPES[m.group()], text)


def _call(payload: dict[str, Any]) -> str:
    return f"{REGISTER}({script_json(payload)});\n"


def explorer_index(explorer: dict[str, Any] | None) -> dict[str, Any]:
    """What the page holds inline: the explorer's settings, the explored ids, the shard files."""
    if not explorer:
        return {"ids": [], "shards": [], "shard_size": EXPLORER_SHARD, "n_latents": 0,
                "whitespace": VISIBLE_WHITESPACE}  # fmt: skip
    ids = sorted(int(k) for k in explorer["latents"])
    index = {k: v for k, v in explorer.items() if k not in ("latents", "vocab")}
    index.update(
        ids=ids,
        shard_size=EXPLORER_SHARD,
        shards=[
            f"{SIDECAR_DIR}/explorer-{n:05d}.js" for n in range(-(-len(ids) // EXPLORER_SHARD))
        ],
        whitespace=VISIBLE_WHITESPACE,
    )
    return index


def explorer_shards(explorer: dict[str, Any] | None) -> dict[str, str]:
    """File name (inside SIDECAR_DIR) -> text of each explorer shard."""
    if not explorer:
        return {}
    ids = sorted(int(k) for k in explorer["latents"])
    vocab = explorer["vocab"]
    out = {}
    for n, lo in enumerate(range(0, len(ids), EXPLORER_SHARD)):
        latents = {str(j): explorer["latents"][str(j)] for j in ids[lo : lo + EXPLORER_SHARD]}
        used = {str(t) for e in latents.values() for g in (e["top"], *e["bands"]) for c in g
                for t in c["t"]}  # fmt: skip
        shard_vocab = {t: vocab[t] for t in sorted(used, key=int) if t in vocab}
        payload = {"kind": "explorer", "shard": n, "latents": latents, "vocab": shard_vocab}
        out[f"explorer-{n:05d}.js"] = _call(payload)
    return out


def table_rows(rows: list[list[Any]]) -> tuple[str, dict[str, str]]:
    """(inline JSON of the rows, or "null" when they go to the sidecar; sidecar files)."""
    text = script_json(rows)
    if len(text) <= ROWS_INLINE_MAX:
        return text, {}
    return "null", {"rows.js": _call({"kind": "rows", "rows": rows})}


def write_sidecar(out_dir: Path, files: dict[str, str]) -> Path | None:
    """Replace out_dir/SIDECAR_DIR with `files` (name -> text): written into a temporary folder
    first, then swapped in, so no stale shard of an earlier report survives and an interrupted
    write leaves the previous folder whole. None (and no folder) when there are no files."""
    target = out_dir / SIDECAR_DIR
    if not files:
        if target.is_dir():
            shutil.rmtree(target)
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{SIDECAR_DIR}-", dir=out_dir))
    try:
        os.chmod(tmp, FILE_MODE | ((FILE_MODE & 0o444) >> 2))  # mkdtemp makes 0700: the umask's
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
            os.chmod(tmp / name, FILE_MODE)
        old = None
        if target.exists():
            old = out_dir / f".{SIDECAR_DIR}-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_shard(path: str | Path) -> dict[str, Any]:
    """The payload of one sidecar file (what it passes to crossdiffLoad)."""
    text = Path(path).read_text(encoding="utf-8")
    head, tail = f"{REGISTER}(", ");\n"
    if not (text.startswith(head) and text.endswith(tail)):
        raise CrossdiffError(
            f"{path} is not a crossdiff report sidecar file (expected {head}...{tail}); write the "
            "report again with `crossdiff report`"
        )
    return json.loads(text[len(head) : -len(tail)])
