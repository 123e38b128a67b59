"""A DeViSE map retrained under the same name and version makes other image vectors
(the embedding service answers with the same model tag). Search's record must refuse it,
even where the retrained map agrees with the old one on one probe picture: here a real
map, the committed one moved only where the first probe's features do not reach, is
served by a real Embedding service, and the record made with the committed map refuses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from services.embed.service import EmbeddingService
from services.search.embedder import InProcessEmbedder
from services.search.probes import probe_image
from services.search.store import MIN_PROBE_AGREEMENT, ImageStore
from tests.conftest import REPO, server_config
from tests.search.conftest import photo_variants

MAP = "devise-minilm"


def _served_by_default(models: Path) -> Path:
    """A copy of the committed DeViSE map that embeds images by default."""
    shutil.copytree(REPO / "models" / MAP, models / MAP)
    config_path = models / MAP / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "default_method": "devise"}))
    return models / MAP


def _embed(models: Path, images: list[bytes], features: list[np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(probe vectors, vectors of ``images``) from a real Embedding service over
    ``models``; with ``features``, also the backbone features of the images it embeds."""
    async def run() -> tuple[np.ndarray, np.ndarray]:
        service = EmbeddingService(server_config("embed", models_dir=models))
        embedder = InProcessEmbedder(service, own=True)
        await embedder.start()
        try:
            if features is not None:
                pooled = service.backbone.features

                def keep(x: torch.Tensor) -> torch.Tensor:
                    out = pooled(x)
                    features.extend(out.float().numpy())
                    return out
                service.backbone.features = keep  # type: ignore[method-assign]
            vectors = np.stack(await embedder.embed_images(images))
        finally:
            await embedder.close()
        return embedder.probes, vectors

    return asyncio.run(run())


def _move_away_from(artifact: Path, feature: np.ndarray, scale: float) -> None:
    """Moves the map's weights by random noise of ``scale`` times their norm that leaves
    its vector of ``feature`` as it was, and writes it back as an export would."""
    weights_path = artifact / "weights.safetensors"
    with safe_open(str(weights_path), "np") as opened:
        metadata = opened.metadata()
    tensors = load_file(str(weights_path))
    weight = tensors["linear.weight"].astype(np.float64)
    noise = np.random.default_rng(1).standard_normal(weight.shape)
    unit = feature.astype(np.float64) / np.linalg.norm(feature)
    noise -= np.outer(noise @ unit, unit)
    noise *= scale * np.linalg.norm(weight) / np.linalg.norm(noise)
    tensors["linear.weight"] = (weight + noise).astype(np.float16)
    save_file(tensors, str(weights_path), metadata=metadata)
    config_path = artifact / "config.json"
    config = json.loads(config_path.read_text())
    config["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    config_path.write_text(json.dumps(config, indent=2))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_map_retrained_under_the_same_tag_is_refused_though_one_probe_agrees(
        tmp_path: Path) -> None:
    photos = photo_variants(8)
    first_probe_feature: list[np.ndarray] = []
    committed = _served_by_default(tmp_path / "committed")
    made_with, photo_vectors = _embed(committed.parent, [probe_image(), *photos],
                                      first_probe_feature)
    record = tmp_path / "index" / "images.sqlite3"
    ImageStore(record, made_with.shape[1], made_with).close()

    retrained = _served_by_default(tmp_path / "retrained")
    _move_away_from(retrained, first_probe_feature[0], scale=0.5)
    probes, moved_photo_vectors = _embed(retrained.parent, [probe_image(), *photos])

    assert _cosines(made_with[:1], probes[:1])[0] >= MIN_PROBE_AGREEMENT  # one probe agrees
    assert _cosines(photo_vectors[1:], moved_photo_vectors[1:]).mean() < MIN_PROBE_AGREEMENT
    with pytest.raises(ValueError, match="another embedding space"):
        ImageStore(record, made_with.shape[1], probes)
    ImageStore(record, made_with.shape[1], made_with).close()  # the committed map still fits
