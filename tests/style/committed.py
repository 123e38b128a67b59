"""The fast-style artifacts committed under models/, read at collection time, so every
style test runs once per installed style (and a new style is tested without editing)."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.artifacts import list_artifacts, read_config
from tests.conftest import REPO

MODELS = REPO / "models"


def committed_styles() -> dict[str, dict[str, Any]]:
    """Style name (what ListStyles and Stylize use) -> the artifact's config.json; the
    name is config["style"]["name"], else the artifact folder's, as the service does."""
    styles = {}
    for artifact in list_artifacts(MODELS, "style"):
        config = read_config(MODELS / artifact)
        styles[config.get("style", {}).get("name", artifact)] = config
    return styles


STYLES = committed_styles()
NAMES = sorted(STYLES)
FIRST = NAMES[0] if NAMES else ""

needs_styles = pytest.mark.skipif(
    not STYLES, reason=f"no fast-style artifact is installed under {MODELS} (a folder whose "
                       "config.json has task 'style'); train one with `make train-style`")

#: parametrize("style", EACH_STYLE): one case per committed style, or one skipped case.
EACH_STYLE: list[Any] = list(NAMES) or [pytest.param("(none)", marks=needs_styles)]
