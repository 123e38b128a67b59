"""DeViSE's linear map and ConSE's convex combination (training/nets/devise.py)."""

from __future__ import annotations

import math

import pytest
import torch

from training import nets
from training.nets.devise import DeViSEMap, conse_embed


def test_conse_matches_a_hand_computation() -> None:
    # 4 classes with 3-d label vectors; T = 2.
    vectors = torch.tensor([[1.0, 0.0, 0.0],
                            [0.0, 1.0, 0.0],
                            [0.0, 0.0, 1.0],
                            [0.6, 0.8, 0.0]])
    probabilities = torch.tensor([[0.1, 0.6, 0.0, 0.3],   # top-2: class 1 (0.6), class 3 (0.3)
                                  [0.7, 0.1, 0.2, 0.0]])  # top-2: class 0 (0.7), class 2 (0.2)
    # Row 0: (0.6 * [0,1,0] + 0.3 * [0.6,0.8,0]) / 0.9 = [0.2, 0.9333, 0]
    # Row 1: (0.7 * [1,0,0] + 0.2 * [0,0,1]) / 0.9 = [0.7778, 0, 0.2222]
    expected = torch.tensor([[0.18 / 0.9, (0.6 + 0.24) / 0.9, 0.0],
                             [0.7 / 0.9, 0.0, 0.2 / 0.9]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    result = conse_embed(probabilities, vectors, top_t=2)
    assert result.shape == (2, 3)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(result.norm(dim=1), torch.ones(2))


def test_conse_with_t1_is_the_top_class_vector_and_ignores_the_rest() -> None:
    vectors = torch.nn.functional.normalize(torch.randn(10, 6, generator=torch.Generator()
                                                        .manual_seed(0)), dim=1)
    probabilities = torch.softmax(torch.randn(3, 10, generator=torch.Generator()
                                              .manual_seed(1)), dim=1)
    result = conse_embed(probabilities, vectors, top_t=1)
    torch.testing.assert_close(result, vectors[probabilities.argmax(dim=1)])


def test_conse_never_picks_a_zeroed_class() -> None:
    vectors = torch.eye(4)
    probabilities = torch.tensor([[0.0, 0.5, 0.3, 0.2]])  # class 0 masked out (zero)
    result = conse_embed(probabilities, vectors, top_t=3)
    assert result[0, 0] == 0
    assert math.isclose(float(result[0, 1] / result[0, 2]), 0.5 / 0.3, rel_tol=1e-5)


def test_conse_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="top_t"):
        conse_embed(torch.ones(1, 3) / 3, torch.eye(3), top_t=4)
    with pytest.raises(ValueError, match="class vectors"):
        conse_embed(torch.ones(1, 3) / 3, torch.eye(4), top_t=1)
    with pytest.raises(ValueError, match="non-negative"):
        conse_embed(torch.tensor([[0.5, -0.1, 0.6]]), torch.eye(3), top_t=1)


def test_devise_map_shapes_and_unit_norm() -> None:
    module = DeViSEMap(1280, 384)
    features = torch.rand(5, 1280) * 6  # ReLU6 features lie in [0, 6]
    out = module(features)
    assert out.shape == (5, 384)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert module.project(features).shape == (5, 384)
    with pytest.raises(ValueError, match=r"\(N, 1280\)"):
        module(torch.rand(5, 1000))
    assert sum(p.numel() for p in module.parameters()) == 1280 * 384 + 384


def test_registered_and_built_from_a_config() -> None:
    module = nets.build({"type": "devise-linear", "in_features": 1280, "out_features": 384})
    assert isinstance(module, DeViSEMap)
    assert (module.in_features, module.out_features) == (1280, 384)
    assert "devise-linear" in nets.architectures()


def test_the_committed_default_map_loads_and_names_its_word_space() -> None:
    import json
    from pathlib import Path

    from training.export import load_exported

    folder = Path(__file__).resolve().parents[2] / "models" / "devise-minilm"
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == "devise" and config["backbone"] == "efficientnet-lite0"
    assert config["space"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["architecture"] == {"type": "devise-linear", "in_features": 1280,
                                      "out_features": 384}
    assert config["noun_vectors"]["recipe"] and config["default_method"] in ("conse", "devise")
    module, _ = load_exported(folder)
    out = module(torch.rand(2, 1280) * 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    provenance = json.loads((folder / "provenance.json").read_text())
    trained = [d for d in provenance["data"] if d["kind"] == "training photo"]
    assert trained and all("heldout" not in d["path"] for d in trained)
