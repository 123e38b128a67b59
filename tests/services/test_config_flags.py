"""services/common/config.py: each server flag, and its PERCEPT_* variable, takes exactly
the values the server can use: counts above 0, ports 0..65535, on/off words in any case,
and a health port of its own."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, config_from_args
from tests.services.test_config_env import _parsed


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        _parsed(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


COUNT_FLAGS = ["--max-batch", "--max-queue", "--max-message-mb", "--max-pixels",
               "--max-inflight-mpixels", "--max-concurrent-rpcs", "--max-iterations",
               "--max-optimisations", "--search-ann-threshold", "--search-nprobe",
               "--search-ef-search"]


@pytest.mark.parametrize("flag", COUNT_FLAGS)
def test_a_count_of_zero_is_refused_and_one_is_taken(
        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"{flag}: must be > 0, got 0" in _refused([flag, "0"], capsys)
    assert "must be > 0, got -3" in _refused([flag, "-3"], capsys)
    assert getattr(_parsed([flag, "1"]), flag.lstrip("-").replace("-", "_")) == 1


def test_a_zero_count_from_the_environment_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEPT_MAX_QUEUE", "0")
    with pytest.raises(ConfigError, match="PERCEPT_MAX_QUEUE='0': must be > 0, got 0"):
        config_from_args("superres", _parsed([]))


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--health-port"])
def test_ports_run_from_0_to_65535(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = flag.lstrip("-").replace("-", "_")
    assert getattr(_parsed([flag, "65535"]), name) == 65535
    assert getattr(_parsed([flag, "0"]), name) == 0
    assert "not a port: 65536" in _refused([flag, "65536"], capsys)
    assert "not a port: -1" in _refused([flag, "-1"], capsys)


@pytest.mark.parametrize("other", ["--port", "--metrics-port"])
def test_the_health_port_may_not_be_the_grpc_or_metrics_port(other: str) -> None:
    args = _parsed(["--port", "50900", "--metrics-port", "50901"])
    taken = 50900 if other == "--port" else 50901
    args.health_port = taken
    with pytest.raises(ConfigError, match=f"--health-port {taken} is taken by --port or "
                                          "--metrics-port"):
        config_from_args("superres", args)
    args.health_port = 50902
    assert config_from_args("superres", args).health_port == 50902


BOOL_FLAGS = ["--fair-share", "--cuda-graphs", "--warmup", "--retain-memory"]


@pytest.mark.parametrize("flag", BOOL_FLAGS)
@pytest.mark.parametrize("word, value", [
    ("off", False), ("OFF", False), (" no ", False), ("false", False), ("0", False),
    ("on", True), ("On", True), ("yes", True), ("true", True), ("1", True)])
def test_on_off_words_are_read_in_any_case(flag: str, word: str, value: bool) -> None:
    config = config_from_args("superres", _parsed([flag, word]))
    assert getattr(config, flag.lstrip("-").replace("-", "_")) is value


@pytest.mark.parametrize("flag", BOOL_FLAGS)
def test_a_word_that_is_neither_on_nor_off_is_refused(
        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "not a boolean: 'maybe'" in _refused([flag, "maybe"], capsys)


@pytest.mark.parametrize("word, value", [("off", False), ("ON", True)])
def test_on_off_words_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           word: str, value: bool) -> None:
    monkeypatch.setenv("PERCEPT_WARMUP", word)
    monkeypatch.setenv("PERCEPT_FAIR_SHARE", word)
    config = config_from_args("superres", _parsed([]))
    assert config.warmup is value and config.fair_share is value
