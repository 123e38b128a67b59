"""Listing the record a page at a time: ImageStore.page, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.search.store import ImageStore, _after_every_id_with

IDS = ["a", "a-1", "a-2", "a\U0010ffff", "ab", "b", "b-1", "é-1", "é-2", "日本-1", "日本-2",
       "z\x00", "z\x00y", "z"]


@pytest.fixture()
def store(tmp_path: Path) -> ImageStore:
    opened = ImageStore(tmp_path / "images.sqlite3", dimension=2)
    opened.put_many([(i, f"uri:{i}", np.ones(2, np.float32)) for i in reversed(IDS)])
    return opened


def walk(store: ImageStore, size: int, prefix: str = "") -> list[list[str]]:
    pages, after = [], ""
    while True:
        page = [entry.id for entry in store.page(after, size, prefix)]
        if not page:
            return pages
        pages.append(page)
        after = page[-1]


def test_pages_walk_every_id_once_in_code_point_order(store: ImageStore) -> None:
    assert [i for page in walk(store, 3) for i in page] == sorted(IDS)
    assert [len(page) for page in walk(store, 4)] == [4, 4, 4, 2]


@pytest.mark.parametrize("prefix", ["a", "a-", "é", "日本", "b-1", "z", "a\U0010ffff", "z\x00",
                                    "q"])
def test_a_prefix_keeps_exactly_the_ids_that_start_with_it(store: ImageStore,
                                                          prefix: str) -> None:
    for size in (1, 2, 100):
        assert [i for page in walk(store, size, prefix) for i in page] == sorted(
            i for i in IDS if i.startswith(prefix))


def test_an_entry_has_its_uri_and_time_not_its_vector(store: ImageStore) -> None:
    [entry] = store.page("", 1)
    assert (entry.id, entry.uri) == ("a", "uri:a") and entry.added > 1.7e9
    assert store.entries(["b", "nope", "a-1"]).keys() == {"b", "a-1"}


def test_the_bound_after_a_prefix() -> None:
    assert _after_every_id_with("ab") == "ac"
    assert _after_every_id_with("a\U0010ffff") == "b"
    assert _after_every_id_with("\U0010ffff") is None
    assert _after_every_id_with("a\ud7ff") == "a\ue000"  # past the surrogates
