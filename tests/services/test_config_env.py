"""services/common/config.py: PERCEPT_* variables are checked as their flags are, and a
bad one stops `percept serve` with exit 2 and its name, never a client command."""

from __future__ import annotations

import argparse

import pytest

from services import cli
from services.common.config import ConfigError, add_server_arguments, config_from_args


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name, value, message", [
    ("PERCEPT_DEVICE", "gpu", "not one of auto, cpu, cuda"),
    ("PERCEPT_COMPILE", "maybe", "not one of auto, on, off"),
    ("PERCEPT_LOG_LEVEL", "verbose", "not one of debug, info, warning, error, critical"),
    ("PERCEPT_LOG_FORMAT", "yaml", "not one of json, text"),
    ("PERCEPT_MAX_WAIT_MS", "-5", "must be a number >= 0"),
    ("PERCEPT_DRAIN_SECONDS", "nan", "must be a number >= 0"),
    ("PERCEPT_MAX_BATCH", "abc", "invalid literal"),
    ("PERCEPT_PORT", "70000", "not a port"),
])
def test_a_bad_environment_value_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    args = _parsed([])
    with pytest.raises(ConfigError, match=f"{name}='{value}': {message}"):
        config_from_args("superres", args)


def test_good_environment_values_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEPT_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("PERCEPT_MAX_WAIT_MS", "0")
    config = config_from_args("superres", _parsed([]))
    assert config.log_level == "warning" and config.max_wait_ms == 0.0


@pytest.mark.parametrize("argv", [["--max-wait-ms", "-1"], ["--drain-seconds", "inf"],
                                  ["--log-level", "verbose"]])
def test_bad_flags_are_refused_by_argparse(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        _parsed(argv)
    assert raised.value.code == 2


def test_serve_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PERCEPT_DEVICE", "gpu")
    assert cli.main(["serve", "superres"]) == 2
    assert "error: PERCEPT_DEVICE='gpu': not one of auto, cpu, cuda" in capsys.readouterr().err


def test_a_bad_server_variable_does_not_break_client_commands(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`percept health` builds the same command line, serve's flags included: a server's
    variable left in the shell must not stop it."""
    monkeypatch.setenv("PERCEPT_PORT", "abc")
    monkeypatch.setenv("PERCEPT_TARGET", "127.0.0.1:1")  # closed: health asks it and fails
    assert cli.main(["health", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "1e12"])
def test_health_refuses_a_timeout_it_cannot_use(timeout: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["health", "--target", "127.0.0.1:1", "--timeout", timeout]) == 2
    assert "--timeout must be a positive number" in capsys.readouterr().err
