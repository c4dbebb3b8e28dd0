"""logs.py: both formats, the process stamp, request ids, redaction, and setup.

Records go through a private ``logging.Logger`` (not registered with the
logging manager) into a handler writing to a StringIO, so no test touches
the process's root logger except the ``setup`` tests, which restore it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from mpipeline import cli, logs

CANARY = "sk-canary-0b7e4d2a9c613f58"
ENV = {"OPENAI_API_KEY": CANARY, "SHORT_TOKEN": "abc", "HOME": "/home/someone-long"}


def _emitter(
    fmt: str,
    *,
    stage: str | None = "inference",
    replica: str | None = "inference-0",
    environ: Mapping[str, str] = ENV,
) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logs.build_handler(fmt, stage=stage, replica=replica, stream=out, environ=environ)
    logger = logging.Logger("mpipeline.test", logging.DEBUG)
    logger.addHandler(handler)
    return logger, out


def _json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_has_the_documented_keys_and_no_request_id_when_absent() -> None:
    logger, out = _emitter("json")
    logger.info("hello %s", "world")
    (rec,) = _json_lines(out)
    assert rec == {
        "ts": rec["ts"],
        "level": "INFO",
        "logger": "mpipeline.test",
        "msg": "hello world",
        "pid": os.getpid(),
        "stage": "inference",
        "replica": "inference-0",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])


def test_json_carries_request_id_and_json_safe_extras() -> None:
    logger, out = _emitter("json")
    logger.warning("failed", extra={"request_id": "r-1", "attempt": 2, "codes": ["a", "b"]})
    (rec,) = _json_lines(out)
    assert rec["request_id"] == "r-1"
    assert rec["attempt"] == 2
    assert rec["codes"] == ["a", "b"]


def test_json_extras_never_shadow_the_core_keys() -> None:
    logger, out = _emitter("json")
    logger.info("x", extra={"ts": 1, "level": "fake", "pid": "nope"})
    (rec,) = _json_lines(out)
    assert isinstance(rec["ts"], str)
    assert rec["level"] == "INFO"
    assert rec["pid"] == os.getpid()


def test_the_process_stamp_wins_over_an_extra() -> None:
    logger, out = _emitter("json", stage="supervisor", replica=None)
    logger.info("x", extra={"stage": "rag", "replica": "rag-0"})
    (rec,) = _json_lines(out)
    assert (rec["stage"], rec["replica"]) == ("supervisor", None)


def test_json_exception_is_one_line_with_the_traceback() -> None:
    logger, out = _emitter("json")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed", extra={"request_id": "r-2"})
    assert out.getvalue().count("\n") == 1
    (rec,) = _json_lines(out)
    assert rec["msg"] == "crashed"
    assert rec["exc"].startswith("Traceback (most recent call last):")
    assert rec["exc"].endswith("ValueError: boom")
    assert rec["request_id"] == "r-2"


def test_json_stack_info_is_kept() -> None:
    logger, out = _emitter("json")
    logger.info("here", stack_info=True)
    (rec,) = _json_lines(out)
    assert rec["stack"].startswith("Stack (most recent call last):")


def test_an_unencodable_extra_is_written_as_its_repr() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    loop: dict[str, Any] = {}
    loop["self"] = loop
    logger, out = _emitter("json")
    logger.info("odd", extra={"thing": Opaque(), "loop": loop, "fine": 1.5})
    (rec,) = _json_lines(out)
    assert rec["thing"] == "<Opaque>"
    assert rec["loop"] == repr(loop)
    assert rec["fine"] == 1.5
    assert rec["msg"] == "odd"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_secret_from_the_environment_is_redacted_everywhere(fmt: str) -> None:
    logger, out = _emitter(fmt)
    try:
        raise RuntimeError(f"upstream said key {CANARY}")
    except RuntimeError:
        logger.exception("calling with %s", CANARY, extra={"header": f"Bearer {CANARY}"})
    logger.info("short values like %s stay", "abc")
    text = out.getvalue()
    assert CANARY not in text
    assert text.count(logs.REDACTED) >= 2
    assert "short values like abc stay" in text
    assert "/home/someone-long" not in logs.secrets_from(ENV)


def test_a_secret_that_json_escapes_is_redacted_in_json() -> None:
    secret = 'quote"and\\slash-secret'
    logger, out = _emitter("json", environ={"WEIRD_SECRET": secret})
    logger.info("value %s", secret)
    assert "quote" not in out.getvalue()
    assert _json_lines(out)[0]["msg"] == f"value {logs.REDACTED}"


def test_a_longer_secret_is_redacted_whole_when_it_contains_a_shorter_one() -> None:
    environ = {"A_KEY": "abcdefgh", "B_TOKEN": "abcdefgh-and-more"}
    logger, out = _emitter("text", environ=environ)
    logger.info("%s", "abcdefgh-and-more")
    assert out.getvalue().rstrip("\n").endswith(f": {logs.REDACTED}")


def test_text_keeps_the_old_look_and_appends_the_request_id() -> None:
    logger, out = _emitter("text")
    logger.info("plain")
    logger.info("about one", extra={"request_id": "r-3"})
    first, second = out.getvalue().splitlines()
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO inference-0\[\d+\] mpipeline\.test: "
    assert re.fullmatch(prefix + "plain", first)
    assert re.fullmatch(prefix + "about one request_id=r-3", second)


def test_text_names_the_supervisor_by_its_stage() -> None:
    logger, out = _emitter("text", stage="supervisor", replica=None)
    logger.error("stopping")
    assert re.search(r" ERROR supervisor\[\d+\] mpipeline\.test: stopping$", out.getvalue())


def test_text_puts_the_request_id_before_the_traceback() -> None:
    logger, out = _emitter("text")
    try:
        raise KeyError("k")
    except KeyError:
        logger.exception("bad", extra={"request_id": "r-4"})
    first, *rest = out.getvalue().splitlines()
    assert first.endswith("bad request_id=r-4")
    assert rest[0] == "Traceback (most recent call last):"


@pytest.mark.parametrize(
    ("fmt", "env", "want"),
    [
        ("auto", None, "text"),
        ("auto", "json", "json"),
        ("auto", " JSON ", "json"),
        ("auto", "text", "text"),
        ("auto", "yaml", "text"),
        ("text", "json", "text"),
        ("json", "text", "json"),
    ],
)
def test_resolve(fmt: str, env: str | None, want: str) -> None:
    environ = {} if env is None else {logs.FORMAT_ENV: env}
    assert logs.resolve(fmt, environ) == want


@pytest.fixture
def root_restored() -> Iterator[logging.Logger]:
    """The root logger and the quieted ones, put back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    try:
        yield root
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        for name, lvl in quiet.items():
            logging.getLogger(name).setLevel(lvl)


def test_setup_installs_one_handler_and_quiets_http_loggers(
    root_restored: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    before = len(root_restored.handlers)
    first, second = io.StringIO(), io.StringIO()
    logs.setup(logging.DEBUG, "json", stage="rag", replica="rag-0", stream=first)
    logs.setup(logging.DEBUG, "json", stage="rag", replica="rag-0", stream=second)
    assert len(root_restored.handlers) == before + 1
    assert root_restored.level == logging.DEBUG
    for name in logs.QUIET_LOGGERS:
        assert logging.getLogger(name).level == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/?key=x")
    logging.getLogger("mpipeline.rag").debug("kept")
    assert first.getvalue() == ""
    (rec,) = _json_lines(second)
    assert (rec["msg"], rec["stage"], rec["replica"]) == ("kept", "rag", "rag-0")


def test_setup_with_an_unknown_format_warns_and_uses_text(
    root_restored: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, "yaml")
    out = io.StringIO()
    logs.setup(logging.INFO, "auto", stage="supervisor", replica=None, stream=out)
    assert "WARNING supervisor[" in out.getvalue()
    assert "unknown log format 'yaml': using text" in out.getvalue()


def test_the_cli_names_the_same_formats_and_variable() -> None:
    assert cli.LOG_FORMATS == logs.FORMATS
    assert cli.LOG_FORMAT_ENV == logs.FORMAT_ENV
    args = cli.build_parser().parse_args(["run", "--log-format", "json", "-v"])
    assert (args.log_format, args.verbose) == ("json", True)
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["run", "--log-format", "xml"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("argv", "env", "want"),
    [
        (["--log-format", "json"], "text", "json"),
        ([], "json", "json"),
        ([], None, "auto"),
    ],
)
def test_run_hands_the_format_to_children_through_the_environment(
    argv: list[str], env: str | None, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpipeline import supervisor

    seen: list[str | None] = []

    def fake_main(*args: object) -> int:
        seen.append(os.environ.get(logs.FORMAT_ENV))
        return 0

    # setenv first, even to delete: then monkeypatch undoes what _run sets.
    monkeypatch.setenv(logs.FORMAT_ENV, env or "")
    if env is None:
        monkeypatch.delenv(logs.FORMAT_ENV)
    monkeypatch.setattr(supervisor, "main", fake_main)
    assert cli.main(["run", *argv]) == 0
    assert seen == [want]


def test_run_refuses_a_bad_format_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(logs.FORMAT_ENV, "yaml")
    assert cli.main(["run"]) == 2
    assert logs.FORMAT_ENV in capsys.readouterr().err
