"""Pictures in and out of the client: reference images, output paths, PNG files with their settings."""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from dit_client.dit_config import MAX_REFERENCE_IMAGE_BYTES, MAX_REFERENCE_IMAGES, ClientConfigError
from dit_client.output_files import check_output_file


def load_reference_images(paths: Sequence[str | os.PathLike]) -> list:
    """Open up to 10 reference images as RGB PIL images, with a clear error for each bad one.

    Each must be at least 64 px a side with an aspect ratio up to 8:1 (the
    pipeline's limits); larger than 1 MP is scaled down by the pipeline.

    The pipeline encodes them with the local VAE; only the text goes to the encoder.
    """
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from PIL import Image, UnidentifiedImageError

    if len(paths) > MAX_REFERENCE_IMAGES:
        raise ClientConfigError(f"{len(paths)} reference images given; FLUX.2 takes at most {MAX_REFERENCE_IMAGES}")
    images = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise ClientConfigError(f"reference image {path} is a directory, not an image file")
        if not path.is_file():
            raise ClientConfigError(f"reference image {path} does not exist")
        size = path.stat().st_size
        if size > MAX_REFERENCE_IMAGE_BYTES:
            raise ClientConfigError(
                f"reference image {path} is {size / 2**20:.0f} MiB; at most {MAX_REFERENCE_IMAGE_BYTES // 2**20} MiB"
            )
        try:
            with warnings.catch_warnings():
                # Pillow only warns below twice its pixel limit; a decompression bomb is an error here.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    images.append(img.convert("RGB"))
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ClientConfigError(
                f"reference image {path} is not an image Pillow can read (PNG, JPEG, WebP...): {exc}"
            ) from None
        except OSError as exc:
            raise ClientConfigError(f"cannot read reference image {path}: {exc}") from None
        try:
            # The pipeline's own limits (at least 64 px a side, aspect ratio up to 8:1), checked up front.
            Flux2ImageProcessor.check_image_input(images[-1])
        except ValueError as exc:
            raise ClientConfigError(f"reference image {path}: {exc}") from None
    return images


def encoded_image(image: bytes | str | os.PathLike | Any) -> bytes:
    """PNG or JPEG bytes of ``image`` for ``Upsample``: bytes as they are, a file's bytes as on disk,
    a PIL image encoded as PNG (the server decodes and checks them)."""
    import io

    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise ClientConfigError(f"image {image}: {exc.strerror or exc}") from None
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise ClientConfigError(f"an image must be PNG/JPEG bytes, a file path or a PIL image, not {type(image).__name__}")


def output_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png``... for several; refused early if ``out`` cannot be written."""
    out = check_output_file(out, suffix=".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_images(images: Sequence, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``images`` as PNG at :func:`output_paths`, each through a temp file and ``os.replace``.

    ``metadata`` goes into a ``flux2-remote`` PNG text chunk as JSON, so a
    picture carries the prompt, seed and settings that made it.
    """
    from PIL.PngImagePlugin import PngInfo

    paths = output_paths(out, len(images))
    info = PngInfo()
    if metadata:
        info.add_itxt("flux2-remote", json.dumps(dict(metadata), ensure_ascii=False))
    for image, path in zip(images, paths, strict=True):
        atomic_write(path, functools.partial(_save_png, image, pnginfo=info), durable=False)
    return paths


def _save_png(image, tmp: Path, *, pnginfo) -> None:
    image.save(tmp, format="PNG", pnginfo=pnginfo)
