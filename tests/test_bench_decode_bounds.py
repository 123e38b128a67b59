"""The decode-bounds benchmark measures what it says: every hostile file is one Pillow
reads whole (so its baseline is a real decode, not an early failure), and the services
refuse or decode each as its row says. No timing here; that is `make bench`'s."""

from __future__ import annotations

from benchmarks import bench_decode_bounds as bench


def test_every_hostile_file_is_read_by_pillow_and_handled_by_the_services() -> None:
    files = bench.hostile(quick=True)
    for name, data in files.items():
        assert bench.pillow(data).ndim == 3, name
        outcome = bench.ours(data)
        if name.startswith("BMP"):  # decoded, by our run-length decoder
            assert outcome == "decoded", (name, outcome)
        else:
            assert outcome.startswith("refused: image is a "), (name, outcome)


def test_ordinary_files_decode() -> None:
    assert {bench.ours(data) for data in bench.ordinary().values()} == {"decoded"}
