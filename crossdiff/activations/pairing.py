"""Pairing presets: which hook point of model A pairs with which hook point of model B.

A preset is a TOML file (format in docs/pairing-presets.md). The shipped ones live in the repo's
`hooks/` folder, installed in the wheel as `crossdiff/hooks/`.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossdiff.plumbing.common import CrossdiffError

_TOP_KEYS = {"name", "description", "drop_bos", "sites", "record"}
_SITE_KEYS = {"a", "b", "layers"}
_RECORD_KEYS = {"expert_indices", "expert_model"}
_EXPERT_MODELS = ("auto", "a", "b")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Pairing:
    """Paired sites (hook of model A, hook of model B) and what else to record per token.

    With several sites, a model's activation is the concatenation of its hooks' outputs in site
    order. `expert_indices` are hooks whose output is the selected experts per token; they are read
    from `expert_model` ("a", "b", or "auto": B if it has them, else A).
    """

    name: str
    sites: tuple[tuple[str, str], ...]
    expert_indices: tuple[str, ...] = ()
    expert_model: str = "auto"
    drop_bos: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if not self.sites:
            raise CrossdiffError(f"pairing {self.name!r} has no sites; add at least one [[sites]]")
        if self.expert_model not in _EXPERT_MODELS:
            raise CrossdiffError(
                f"pairing {self.name!r}: record.expert_model is {self.expert_model!r}; "
                f"expected one of {_EXPERT_MODELS}"
            )

    @property
    def hooks_a(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.sites)

    @property
    def hooks_b(self) -> tuple[str, ...]:
        return tuple(b for _, b in self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "drop_bos": self.drop_bos,
            "sites": [{"a": a, "b": b} for a, b in self.sites],
            "record": {
                "expert_indices": list(self.expert_indices),
                "expert_model": self.expert_model,
            },
        }

    @classmethod
    def from_dict(cls, table: dict[str, Any], source: str = "<dict>") -> Pairing:
        return _parse(table, source)


def hook_layer(hook_name: str) -> int | None:
    """The block index a hook belongs to; -1 for the embedding hooks; None for after the blocks."""
    match = _LAYER_RE.match(hook_name)
    if match:
        return int(match.group(1))
    if hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return -1
    return None


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CrossdiffError(f"{where} has unknown keys {unknown}; allowed keys: {sorted(allowed)}")


def _expand(template: str, layers: list[int] | None, where: str) -> list[str]:
    if "{L}" not in template:
        return [template]
    if not layers:
        raise CrossdiffError(f"{where}: {template!r} uses {{L}} but no `layers = [...]` is given")
    return [template.replace("{L}", str(layer)) for layer in layers]


def _parse(table: dict[str, Any], source: str) -> Pairing:
    _check_keys(table, _TOP_KEYS, f"pairing {source}")
    name = table.get("name") or Path(source).stem
    sites_table = table.get("sites")
    if not isinstance(sites_table, list) or not sites_table:
        raise CrossdiffError(
            f"pairing {source} needs at least one [[sites]] table with keys `a` and `b` "
            '(e.g. a = "blocks.2.hook_resid_post")'
        )
    sites: list[tuple[str, str]] = []
    all_layers: list[int] = []
    for i, site in enumerate(sites_table):
        where = f"pairing {source}, site {i}"
        if not isinstance(site, dict):
            raise CrossdiffError(f"{where} must be a table with keys `a` and `b`")
        _check_keys(site, _SITE_KEYS, where)
        if not isinstance(site.get("a"), str) or not isinstance(site.get("b"), str):
            raise CrossdiffError(f"{where} needs string keys `a` and `b` (hook names)")
        layers = site.get("layers")
        if layers is not None and (
            not isinstance(layers, list) or not all(isinstance(x, int) for x in layers)
        ):
            raise CrossdiffError(f"{where}: `layers` must be a list of integers, got {layers!r}")
        hooks_a = _expand(site["a"], layers, where)
        hooks_b = _expand(site["b"], layers, where)
        if len(hooks_a) != len(hooks_b):
            raise CrossdiffError(
                f"{where}: `a` expands to {len(hooks_a)} hooks but `b` to {len(hooks_b)}; "
                "use {L} in both or in neither"
            )
        sites.extend(zip(hooks_a, hooks_b, strict=True))
        all_layers.extend(layers or [])
    record = table.get("record", {})
    if not isinstance(record, dict):
        raise CrossdiffError(f"pairing {source}: [record] must be a table")
    _check_keys(record, _RECORD_KEYS, f"pairing {source}, [record]")
    expert_hooks: list[str] = []
    for template in record.get("expert_indices", []):
        expert_hooks.extend(_expand(template, sorted(set(all_layers)), f"pairing {source}"))
    drop_bos = table.get("drop_bos", True)
    if not isinstance(drop_bos, bool):
        raise CrossdiffError(f"pairing {source}: drop_bos must be true or false, got {drop_bos!r}")
    return Pairing(
        name=str(name),
        sites=tuple(sites),
        expert_indices=tuple(dict.fromkeys(expert_hooks)),
        expert_model=record.get("expert_model", "auto"),
        drop_bos=drop_bos,
        description=str(table.get("description", "")),
    )


def preset_dirs() -> list[Path]:
    """Preset folders: the installed `crossdiff/hooks`, then the source tree's `hooks/`."""
    dirs: list[Path] = []
    try:
        installed = importlib.resources.files("crossdiff") / "hooks"
        if installed.is_dir():
            dirs.append(Path(str(installed)))
    except (ModuleNotFoundError, TypeError):
        pass
    source_tree = Path(__file__).resolve().parents[2] / "hooks"
    if source_tree.is_dir() and source_tree not in dirs:
        dirs.append(source_tree)
    return dirs


def _preset_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in preset_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def list_pairings() -> list[str]:
    """Names of the shipped pairing presets."""
    return sorted(_preset_files())


def load_pairing(name_or_path: str | Path | Pairing) -> Pairing:
    """A shipped preset by name (e.g. "paper"), or a TOML file by path."""
    if isinstance(name_or_path, Pairing):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        presets = _preset_files()
        if text not in presets:
            if text.endswith(".toml") or "/" in text:
                raise CrossdiffError(f"pairing file not found: {path}")
            raise CrossdiffError(
                f"unknown pairing preset {text!r}; known presets: {sorted(presets)}; "
                "or pass the path to your own TOML file (see docs/pairing-presets.md)"
            )
        path = presets[text]
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CrossdiffError(f"pairing file {path} is not valid TOML: {err}") from err
    return _parse(table, str(path))
