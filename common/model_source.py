"""Resolve a MODEL argument (hub id, local folder or ``demo``) to a local folder.

All three end as a folder in the layout ``Flux2Pipeline.save_pretrained``
writes; everything after this module loads from that folder with the
libraries' own ``from_pretrained``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "black-forest-labs/FLUX.2-dev"


class ModelNotFound(Exception):
    """The MODEL argument names nothing we can load."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user asked for and where its files are."""

    model_id: str  # as given: hub id, folder or "demo"
    folder: Path
    revision: str  # hub commit when known
    demo: bool

    def component(self, name: str) -> Path:
        return self.folder / name


def resolve_model(
    model: str, *, components: tuple[str, ...], revision: str | None = None, configs_only: bool = False
) -> ModelSource:
    """Find or download only ``components`` (sub-folders such as ``text_encoder``) of ``model``.

    Hub downloads honour the usual Hugging Face cache and ``HF_HUB_OFFLINE``.
    With ``configs_only`` a hub model gets only the components' JSON files (kilobytes),
    so settings can be checked before gigabytes of weights are fetched.
    """
    from common.demo import ensure_demo_model, is_demo_folder

    if model == "demo":
        folder = ensure_demo_model()
        return ModelSource("demo", folder, "", True)
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

    patterns = [f"{c}/*.json" if configs_only else f"{c}/*" for c in components] + ["model_index.json"]
    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"{model} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): download it first, or pass a local folder"
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelNotFound(f"cannot fetch {model} from the hub: {exc}") from exc
    return ModelSource(model, folder, folder.name, False)
