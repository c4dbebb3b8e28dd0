from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema_rs
import pytest

from mpipeline import __version__, _shm, config, rundir, supervisor
from mpipeline.cli import main
from mpipeline.errors import ConfigError, ConfigIssue, ExitCode
from mpipeline.ops import args

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


@pytest.mark.parametrize(
    ("toml", "refused"),
    [
        ('colour = "blue"\n', "colour: unknown key"),
        ('[gateway]\nport = "eighty"\n', "gateway.port: expected int, got str"),
        ("[stages.inference]\nreplicas = 0\n", "stages.inference.replicas: must be >= 1"),
    ],
)
def test_config_schema_refuses_what_validate_refuses_and_accepts_the_shipped_file(
    toml: str, refused: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Editors check pipeline.toml against this schema: it must agree with the loader."""
    assert main(["config", "schema"]) == ExitCode.OK
    schema = jsonschema_rs.validator_for(json.loads(capsys.readouterr().out))
    assert schema.is_valid(tomllib.loads(DEFAULT_CONFIG.read_text()))
    assert schema.is_valid(tomllib.loads(config.dump_toml(config.PipelineConfig())))
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    assert not schema.is_valid(tomllib.loads(toml))
    assert main(["config", "validate", str(bad)]) == ExitCode.USAGE
    assert refused in capsys.readouterr().err


def test_shm_sweep_removes_the_segments_of_dead_creators_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A private /dev/shm: the machine's may hold segments of runs of other users or sessions.
    monkeypatch.setattr(_shm, "SHM_DIR", tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        born = _shm.proc_start_ticks(child.pid)
    finally:
        child.kill()
        child.wait()
    assert born is not None
    me = _shm.proc_start_ticks(os.getpid())
    assert me is not None

    def segment(name: str, magic: int, pid: int, start_ticks: int) -> None:
        (tmp_path / name).write_bytes(_shm.CREATOR_SLOTS.pack(magic, pid, start_ticks) + bytes(64))

    segment("mpl-dead", _shm.MAGIC, child.pid, born)
    (tmp_path / "mpl-dead.dbell").write_bytes(b"")
    segment("mpl-live", _shm.MAGIC, os.getpid(), me)
    segment("mpl-not-ours", _shm.MAGIC ^ 1, child.pid, born)  # the prefix alone proves nothing
    (tmp_path / "mpl-orphan.sbell").write_bytes(b"")  # a doorbell without its segment

    assert main(["shm", "sweep"]) == ExitCode.OK
    assert capsys.readouterr().out == "mpl-dead\nremoved 1 stale segments\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpl-live", "mpl-not-ours"]


def test_config_validate_error_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: Path) -> list[ConfigIssue]:
        raise ConfigError("x.toml: cannot read")

    monkeypatch.setattr(config, "validate", broken)
    assert main(["config", "validate", "x.toml"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "x.toml: cannot read\n"


# Built-in defaults, the environment, command-line overrides (issue 19)


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no config/ and no $MPIPELINE_CONFIG, as after a pip install."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    return tmp_path


def test_the_cli_and_the_config_agree_on_the_default_file() -> None:
    assert (args.DEFAULT_CONFIG, args.CONFIG_ENV) == (config.DEFAULT_PATH, config.CONFIG_ENV)


def test_config_show_and_validate_without_a_file_use_the_defaults(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show"]) == ExitCode.OK
    assert capsys.readouterr().out == config.dump_toml(config.PipelineConfig())
    assert main(["config", "validate"]) == ExitCode.OK
    assert capsys.readouterr().out == "built-in defaults: ok\n"


def test_config_commands_read_the_environments_file_and_the_option_wins(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (elsewhere / "env.toml").write_text('name = "from-env"\n')
    (elsewhere / "opt.toml").write_text('name = "from-option"\n')
    monkeypatch.setenv(config.CONFIG_ENV, "env.toml")
    assert main(["config", "show"]) == ExitCode.OK
    assert 'name = "from-env"' in capsys.readouterr().out
    assert main(["config", "show", "--config", "opt.toml"]) == ExitCode.OK
    assert 'name = "from-option"' in capsys.readouterr().out
    assert rundir.find_run_dir(None, None) == rundir.base_dir() / "from-env"
    assert rundir.find_run_dir(None, Path("opt.toml")) == rundir.base_dir() / "from-option"
    # A file the variable names must exist: a typo never runs on the defaults.
    monkeypatch.setenv(config.CONFIG_ENV, "typo.toml")
    assert main(["config", "validate"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "typo.toml: no such file\n"
    with pytest.raises(ConfigError, match="no such file"):
        rundir.find_run_dir(None, None)


def test_status_and_run_find_the_same_run_dir_without_a_file(elsewhere: Path) -> None:
    assert rundir.find_run_dir(None, None) == rundir.resolve_run_dir(config.PipelineConfig())


def test_run_hands_the_supervisor_no_file_and_the_overrides(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, ...]] = []

    def fake_main(*given: object) -> int:
        calls.append(given)
        return 0

    monkeypatch.setattr(supervisor, "main", fake_main)
    monkeypatch.delenv("MPIPELINE_LOG_FORMAT", raising=False)
    assert main(["run"]) == 0
    assert main(["run", "--host", "::1", "--port", "0", "--metrics-port", "9191"]) == 0
    assert main(["run", "--config", "x.toml", "--port", "65535"]) == 0
    assert [(c[0], c[4]) for c in calls] == [
        (None, {}),
        (None, {"gateway.host": "::1", "gateway.port": 0, "metrics.port": 9191}),
        (Path("x.toml"), {"gateway.port": 65535}),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "argument --port: must be 0-65535 (0: any free port): '70000'"),
        (["--port", "-1"], "argument --port: must be 0-65535 (0: any free port): '-1'"),
        (["--metrics-port", "http"], "argument --metrics-port: not a port number: 'http'"),
    ],
)
def test_run_refuses_a_bad_port(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", *argv])
    assert info.value.code == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_config_init_prints_or_writes_the_commented_defaults(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "init"]) == ExitCode.OK
    assert capsys.readouterr().out == config.default_toml() == DEFAULT_CONFIG.read_text()
    assert main(["config", "init", "config/pipeline.toml"]) == ExitCode.OK
    assert capsys.readouterr().out == "wrote config/pipeline.toml\n"
    assert (elsewhere / "config" / "pipeline.toml").read_text() == config.default_toml()


def test_config_init_never_overwrites_unless_forced(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = elsewhere / "pipeline.toml"
    mine.write_text("# mine\n")
    assert main(["config", "init", "pipeline.toml"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "pipeline.toml: exists; --force overwrites it\n"
    assert mine.read_text() == "# mine\n"
    assert main(["config", "init", "--force", "pipeline.toml"]) == ExitCode.OK
    assert mine.read_text() == config.default_toml()


def test_config_init_and_export_say_what_they_cannot_write(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (elsewhere / "plain").write_text("")
    assert main(["config", "init", "plain/pipeline.toml"]) == ExitCode.FAILURE
    assert capsys.readouterr().err == "cannot write plain: Not a directory\n"
    assert main(["config", "init", "--force", "."]) == ExitCode.FAILURE
    assert capsys.readouterr().err == "cannot write .: Is a directory\n"
    assert main(["config", "export", "plain"]) == ExitCode.FAILURE
    assert capsys.readouterr().err == "cannot write plain: Not a directory\n"
    locked = elsewhere / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        assert main(["config", "init", "locked/p.toml"]) == ExitCode.FAILURE
        assert capsys.readouterr().err == "cannot write locked/p.toml: Permission denied\n"


def test_config_export_writes_the_shipped_files_once(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "export", "out"]) == ExitCode.OK
    names = list(config.shipped_files())
    assert capsys.readouterr().out.splitlines() == [f"wrote out/{n}" for n in names]
    assert main(["config", "export", "out"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "out/pipeline.toml: exists; --force overwrites it\n"
    assert main(["config", "export", "--force", "out"]) == ExitCode.OK
    capsys.readouterr()


def test_config_export_needs_a_folder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config", "export"])
    assert info.value.code == ExitCode.USAGE
    assert "the following arguments are required: DIR" in capsys.readouterr().err
