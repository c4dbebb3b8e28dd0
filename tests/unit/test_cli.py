from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from mpipeline import __version__, _shm, config
from mpipeline.cli import main
from mpipeline.errors import ConfigError, ConfigIssue, ExitCode

DEFAULT_CONFIG = Path(__file__).parents[2] / "config" / "pipeline.toml"


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "config", "shm"):
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"mpipeline {__version__}"


@pytest.mark.parametrize("argv", [[], ["config"], ["shm"], ["bogus"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == ExitCode.USAGE


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["mpipeline", "config", "schema"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("mpipeline", run_name="__main__")
    assert info.value.code == ExitCode.OK
    assert json.loads(capsys.readouterr().out)


def test_config_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(DEFAULT_CONFIG)]) == ExitCode.OK
    assert capsys.readouterr().out == f"{DEFAULT_CONFIG}: ok\n"


def test_config_validate_takes_the_file_as_an_argument_or_as_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The form config/pipeline.toml's header shows works, as does the positional one."""
    for argv in (
        ["config", "validate", "--config", str(DEFAULT_CONFIG)],
        ["config", "validate", str(DEFAULT_CONFIG), "--config", str(DEFAULT_CONFIG)],
    ):
        assert main(argv) == ExitCode.OK
        assert capsys.readouterr().out == f"{DEFAULT_CONFIG}: ok\n"
    assert main(["config", "show", "--config", str(DEFAULT_CONFIG)]) == ExitCode.OK
    assert capsys.readouterr().out.startswith("name = ")
    assert main(["config", "validate", "a.toml", "--config", "b.toml"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "name one config file, not a.toml and b.toml\n"


def test_the_default_config_header_shows_commands_that_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    header = [
        line for line in DEFAULT_CONFIG.read_text().splitlines() if "mpipeline config" in line
    ]
    assert header
    for line in header:
        command = line.split("mpipeline ", 1)[1].split("(")[0].split("`")[0].split()
        argv = [str(DEFAULT_CONFIG) if word == "FILE" else word for word in command]
        assert main(argv) == ExitCode.OK, line
    capsys.readouterr()


def test_config_validate_reports_issues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml\n")
    assert main(["config", "validate", str(bad)]) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(bad) in captured.err


def test_config_show_prints_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(DEFAULT_CONFIG)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.endswith("\n")
    assert config.dump_toml(config.load(DEFAULT_CONFIG)).rstrip("\n") == out.rstrip("\n")


def test_config_show_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["config", "show", str(missing)]) == ExitCode.USAGE
    assert str(missing) in capsys.readouterr().err


def test_config_read_error_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(path: Path) -> config.PipelineConfig:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config, "load", denied)
    assert main(["config", "show", str(tmp_path / "x.toml")]) == ExitCode.USAGE
    assert capsys.readouterr().err == f"{tmp_path / 'x.toml'}: Permission denied\n"


def test_config_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == ExitCode.OK
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_shm_sweep(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(_shm, "sweep_stale", lambda: ["mpl-dead-a", "mpl-dead-b"])
    assert main(["shm", "sweep"]) == ExitCode.OK
    assert capsys.readouterr().out == "mpl-dead-a\nmpl-dead-b\nremoved 2 stale segments\n"


def test_config_validate_error_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: Path) -> list[ConfigIssue]:
        raise ConfigError("x.toml: cannot read")

    monkeypatch.setattr(config, "validate", broken)
    assert main(["config", "validate", "x.toml"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "x.toml: cannot read\n"
