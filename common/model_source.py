"""Resolve a MODEL argument (hub id, local folder, ``demo`` or ``demo-klein``) to a local folder.

All of them end as a folder in the layout ``Flux2Pipeline.save_pretrained``
(or ``Flux2KleinPipeline.save_pretrained``) writes; everything after this module loads from that folder with the
libraries' own ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "black-forest-labs/FLUX.2-dev"
# A sharded checkpoint's map from weight names to shard files (transformers' name).
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


class ModelNotFound(Exception):
    """The MODEL argument names nothing we can load."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user asked for and where its files are."""

    model_id: str  # as given: hub id, folder, "demo" or "demo-klein"
    folder: Path
    revision: str  # hub commit when known
    demo: bool

    def component(self, name: str) -> Path:
        return self.folder / name


def resolve_model(
    model: str,
    *,
    components: tuple[str, ...],
    revision: str | None = None,
    configs_only: bool = False,
    keep_weight_for: Callable[[Path], Callable[[str, str], bool]] | None = None,
) -> ModelSource:
    """Find or download only ``components`` (sub-folders such as ``text_encoder``) of ``model``.

    Hub downloads honour the usual Hugging Face cache and ``HF_HUB_OFFLINE``.
    With ``configs_only`` a hub model gets only the components' JSON files (kilobytes),
    so settings can be checked before gigabytes of weights are fetched.
    With ``keep_weight_for``, a sharded hub checkpoint gets only the shards that hold a
    kept weight: ``keep_weight_for(folder)`` is called once the components' small files
    (configs, indexes, tokenizer) are in ``folder``, and returns
    ``keep_weight(component, weight_name)``, so which weights are kept can depend on
    the model's own config; the returned folder is then a view (links into the
    Hugging Face cache, and an index listing only the kept weights) that
    ``from_pretrained`` loads like a complete folder. Local folders are used as they are.
    """
    from common.demo import DEMO_MODELS, ensure_demo_model, is_demo_folder

    if model in DEMO_MODELS:
        folder = ensure_demo_model(variant=DEMO_MODELS[model])
        return ModelSource(model, folder, "", True)
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [c for c in components if not (path / c).is_dir()]
        if missing:
            raise ModelNotFound(
                f"{path} has no {', '.join(missing)}/ folder; expected the layout Flux2Pipeline.save_pretrained writes"
            )
        return ModelSource(model, path.resolve(), "", is_demo_folder(path))
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelNotFound(f"no such folder: {model}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        if keep_weight_for is not None and not configs_only:
            folder = _download_kept_weights(model, revision, components, keep_weight_for, snapshot_download)
        else:
            files = "*.json" if configs_only else "*"
            patterns = [f"{c}/{files}" for c in components] + ["model_index.json"]
            folder = Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"{model} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): download it first, or pass a local folder"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelNotFound(f"cannot fetch {model} from the hub: {exc}") from exc
    return ModelSource(model, folder, _commit_of(folder), False)


def _commit_of(folder: Path) -> str:
    view = folder / VIEW_MARKER
    return json.loads(view.read_text())["commit"] if view.is_file() else folder.name


# -- partial downloads ---------------------------------------------------------

VIEW_MARKER = "flux2_remote_view.json"


def _download_kept_weights(model, revision, components, keep_weight_for, snapshot_download) -> Path:
    """Everything but the weights, then only the shards holding kept weights; a view if any shard was left out."""
    small = [f"{c}/*" for c in components] + ["model_index.json"]
    snapshot = Path(snapshot_download(model, revision=revision, allow_patterns=small, ignore_patterns=WEIGHT_PATTERNS))
    keep_weight = keep_weight_for(snapshot)
    wanted: list[str] = []
    skipped: dict[str, set[str]] = {}
    for c in components:
        index = snapshot / c / WEIGHTS_INDEX
        if not index.is_file():
            wanted += [f"{c}/{p}" for p in WEIGHT_PATTERNS]  # one file, or no weights at all
            continue
        weight_map = json.loads(index.read_text())["weight_map"]
        kept = {name for name, shard in weight_map.items() if keep_weight(c, name)}
        shards = {weight_map[name] for name in kept}
        wanted += [f"{c}/{shard}" for shard in sorted(shards)]
        if shards != set(weight_map.values()):
            skipped[c] = kept
    snapshot = Path(snapshot_download(model, revision=revision, allow_patterns=wanted))
    if not skipped:
        return snapshot
    return _build_view(model, snapshot, skipped)


def _build_view(model: str, snapshot: Path, kept_by_component: dict[str, set[str]]) -> Path:
    """A folder of links into ``snapshot`` whose indexes name only the kept weights.

    Kept in our cache beside the demo model, never inside the Hugging Face cache,
    which other tools share. Named by what it holds and never changed once
    written, so servers starting side by side can share it.
    """
    from common.demo import cache_root

    recipe = json.dumps({"snapshot": str(snapshot), "kept": {c: sorted(k) for c, k in kept_by_component.items()}})
    name = f"{snapshot.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    final = cache_root() / "hub-views" / model.replace("/", "--") / name
    if (final / VIEW_MARKER).is_file():
        return final
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir(parents=True)
    try:
        for entry in snapshot.iterdir():
            kept = kept_by_component.get(entry.name)
            if kept is None:
                (tmp / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
                continue
            (tmp / entry.name).mkdir()
            index = json.loads((entry / WEIGHTS_INDEX).read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in kept}
            (tmp / entry.name / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
            for f in entry.iterdir():
                if f.name != WEIGHTS_INDEX:
                    (tmp / entry.name / f.name).symlink_to(f.resolve())
        (tmp / VIEW_MARKER).write_text(json.dumps({"model": model, "commit": snapshot.name, "snapshot": str(snapshot)}))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / VIEW_MARKER).is_file():  # not just another server writing the same view first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
