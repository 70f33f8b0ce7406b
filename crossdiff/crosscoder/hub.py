"""Publishing a crosscoder on the Hugging Face Hub and loading it back by `hf://repo_id[/subfolder]`.

`push_to_hub(folder, repo_id)` uploads the crosscoder folder's files (cfg.json with its provenance,
sae_weights.safetensors, the weights' checksum `sae_weights.safetensors.sha256`, training.json;
checkpoint folders are left out), the report folder when one is given (to `report/`), and a model
card README.md that says how to load it. `load_crosscoder("hf://owner/name[/subfolder][@revision]")`
downloads that folder (huggingface_hub's cache) and loads it as a local folder is loaded: the
checksum is verified, so a damaged download is refused rather than loaded unverified.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError

HF_SCHEME = "hf://"
CARD = "README.md"
REPORT_DIR = "report"


def parse_hf_url(url: str) -> tuple[str, str | None, str | None]:
    """'hf://owner/name/sub/folder@rev' -> ('owner/name', 'sub/folder', 'rev')."""
    rest = url[len(HF_SCHEME) :] if url.startswith(HF_SCHEME) else url
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2 or revision == "":
        raise CrossdiffError(
            f"{url!r} is not a hub address; expected hf://owner/name, hf://owner/name/subfolder "
            "or either with @revision (a branch, tag or commit)"
        )
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None), revision


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise CrossdiffError(
            "publishing or loading a crosscoder on the Hugging Face Hub needs huggingface_hub; "
            "pip install huggingface_hub"
        ) from err
    return huggingface_hub


def model_card(repo_id: str, subfolder: str | None, cfg: dict[str, Any], report: bool) -> str:
    """A short README.md: what it is, how to load it (and the import SAELens needs first)."""
    address = HF_SCHEME + repo_id + (f"/{subfolder}" if subfolder else "")
    meta = cfg.get("metadata") or {}
    names = meta.get("model_names") or []
    lines = [
        "---",
        "library_name: crossdiff",
        "tags: [crossdiff, crosscoder, sae_lens, interpretability]",
        "---",
        f"# crossdiff crosscoder: {' vs '.join(names) or 'two models'}",
        "",
        f"A sparse crosscoder (d_sae={cfg.get('d_sae')}, k={cfg.get('k')}, d_model="
        f"{cfg.get('d_model')}) trained with crossdiff on paired activations "
        f"(hooks: {meta.get('hook_points')}). cfg.json holds its provenance (versions, models, "
        "tokenizer, store fingerprint); training.json its training record; "
        "sae_weights.safetensors.sha256 the weights' checksum"
        + ("; report/ the feature-diff report." if report else "."),
        "",
        "```python",
        "import crossdiff",
        "",
        f'cc = crossdiff.load_crosscoder("{address}")',
        "```",
        "",
        "With SAELens directly: `import crossdiff` first (it registers the architecture "
        "'crossdiff.crosscoder'; without it SAELens raises KeyError: 'crossdiff.crosscoder'), then "
        "`sae_lens.SAE.load_from_disk(<downloaded folder>)`.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    subfolder: str | None = None,
    report: str | Path | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the crosscoder in `folder` (and `report`, a report folder) to `repo_id` on the Hub,
    under `subfolder` if given; returns the `hf://` address `load_crosscoder` takes."""
    from crossdiff.plumbing.common import read_json

    folder = Path(folder)
    for name in ("cfg.json", "sae_weights.safetensors", "sae_weights.safetensors.sha256"):
        if not (folder / name).is_file():
            raise CrossdiffError(
                f"{folder} has no {name}; push a folder written by CrossCoder.save or "
                "`crossdiff train-crosscoder` (cfg.json, weights and their checksum)"
            )
    if report is not None and not Path(report).is_dir():
        raise CrossdiffError(f"report={report} is not a folder; pass the report's output folder")
    cfg = read_json(folder / "cfg.json", "crosscoder config")
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crossdiff-push-") as tmp:
        staging = Path(tmp)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                shutil.copy2(path, staging / path.name)
            elif path.is_dir() and path.name == REPORT_DIR:  # checkpoints and others stay
                shutil.copytree(path, staging / REPORT_DIR)
        if report is not None:
            shutil.copytree(Path(report), staging / REPORT_DIR, dirs_exist_ok=True)
        if not (staging / CARD).exists():
            card = model_card(repo_id, subfolder, cfg, (staging / REPORT_DIR).is_dir())
            (staging / CARD).write_text(card)
        api.upload_folder(
            folder_path=str(staging),
            repo_id=repo_id,
            repo_type="model",
            path_in_repo=subfolder or "",
            revision=revision,
            commit_message=commit_message or f"crossdiff crosscoder from {folder.name}",
        )
    address = HF_SCHEME + repo_id + (f"/{subfolder}" if subfolder else "")
    print(f"pushed {folder} to {address}")
    return address


def download(url: str, token: str | None = None) -> Path:
    """The local folder (huggingface_hub's cache) holding the crosscoder at `url`."""
    repo_id, subfolder, revision = parse_hf_url(url)
    hub = _hub()
    patterns = None if subfolder is None else [f"{subfolder}/*", f"{subfolder}/**"]
    try:
        root = hub.snapshot_download(
            repo_id, repo_type="model", revision=revision, allow_patterns=patterns, token=token
        )
    except Exception as err:  # RepositoryNotFoundError, RevisionNotFoundError, offline, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise CrossdiffError(
            f"could not download {url} ({type(err).__name__}: {first}); "
            "check the repository id, subfolder and revision, your network (or HF_HUB_OFFLINE "
            "with the files cached) and, for a private repository, your token"
        ) from err
    path = Path(root) / subfolder if subfolder else Path(root)
    if not (path / "cfg.json").is_file():
        raise CrossdiffError(
            f"{url} has no cfg.json (looked in {path}); is it a crosscoder pushed with "
            "crossdiff.push_to_hub, and is the subfolder right?"
        )
    return path
