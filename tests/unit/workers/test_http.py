"""What the HTTP upstreams share: the key holder, Retry-After, and the status table."""

from __future__ import annotations

import asyncio
import email.utils
import pickle
import time

import httpx
import pytest

from mpipeline.config import TimeoutsConfig, UpstreamConfig
from mpipeline.errors import ConfigError, ErrorCode
from mpipeline.workers import _failures, _http

CANARY = "sk-canary-7f3a9c1e5b"


def test_api_key_never_prints_or_pickles() -> None:
    key = _http.ApiKey(CANARY)
    assert key.reveal() == CANARY
    assert CANARY not in repr(key) and CANARY not in str(key) and CANARY not in f"{key}"
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_read_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _http.read_api_key(None) is None
    monkeypatch.setenv("MPL_TEST_KEY", CANARY)
    key = _http.read_api_key("MPL_TEST_KEY")
    assert key is not None and key.reveal() == CANARY


@pytest.mark.parametrize("value", [None, "", "sk key", "sk-\u00e9", "sk-\n"])
def test_unusable_key_names_the_variable_not_the_value(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("MPL_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("MPL_TEST_KEY", value)
    with pytest.raises(ConfigError, match="MPL_TEST_KEY") as info:
        _http.read_api_key("MPL_TEST_KEY")
    if value:
        assert value not in str(info.value)


def test_client_has_no_retries_redirects_or_http2() -> None:
    t = TimeoutsConfig(connect_s=1, first_token_s=4, between_tokens_s=2, total_s=20)
    config = UpstreamConfig(base_url="http://127.0.0.1:9", model="m", timeouts=t)

    async def main() -> None:
        async with _http.build_client(config, {}) as client:
            assert client.follow_redirects is False
            assert client.timeout.connect == 1
            assert client.timeout.read == 4 * _http.BACKSTOP_FACTOR
            # The workers' own client shows its policy; these are the settings that matter.
            pool = client
            assert pool.retries == 0 and pool.http2 is False
            assert pool.max_connections == config.max_concurrency

    asyncio.run(main())
    assert _http.unary_timeout(t).read == 20 * _http.BACKSTOP_FACTOR


def _headers(**values: str) -> httpx.Headers:
    return httpx.Headers({k.replace("_", "-"): v for k, v in values.items()})


def test_retry_after_forms() -> None:
    assert _failures.parse_retry_after(_headers(retry_after="2")) == 2.0
    assert _failures.parse_retry_after(_headers(retry_after="1.5")) == 1.5
    assert _failures.parse_retry_after(_headers(retry_after_ms="250", retry_after="9")) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = _failures.parse_retry_after(_headers(retry_after=when))
    assert parsed is not None and 28 <= parsed <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert _failures.parse_retry_after(_headers(retry_after=past)) == 0.0
    for bad in ("soon", "-1", "nan", "inf", ""):
        assert _failures.parse_retry_after(_headers(retry_after=bad)) is None
    assert _failures.parse_retry_after(_headers()) is None


@pytest.mark.parametrize(
    ("status", "retryable", "counts", "code"),
    [
        (400, False, False, ErrorCode.UPSTREAM_ERROR),
        (401, False, True, ErrorCode.UPSTREAM_ERROR),
        (403, False, True, ErrorCode.UPSTREAM_ERROR),
        (404, False, False, ErrorCode.UPSTREAM_ERROR),
        (405, False, False, ErrorCode.UPSTREAM_ERROR),
        (408, True, True, ErrorCode.UPSTREAM_ERROR),
        (409, True, True, ErrorCode.UPSTREAM_ERROR),
        (413, False, False, ErrorCode.UPSTREAM_ERROR),
        (422, False, False, ErrorCode.UPSTREAM_ERROR),
        (425, True, True, ErrorCode.UPSTREAM_ERROR),
        (429, True, False, ErrorCode.UPSTREAM_RATE_LIMITED),
        (500, True, True, ErrorCode.UPSTREAM_ERROR),
        (502, True, True, ErrorCode.UPSTREAM_ERROR),
        (503, True, True, ErrorCode.UPSTREAM_ERROR),
        (504, True, True, ErrorCode.UPSTREAM_ERROR),
        (529, True, True, ErrorCode.UPSTREAM_ERROR),
        (302, False, True, ErrorCode.UPSTREAM_ERROR),
    ],
)
def test_status_table(status: int, retryable: bool, counts: bool, code: ErrorCode) -> None:
    failure = _failures.status_failure(status, httpx.Headers(), b"")
    assert (failure.retryable, failure.counts, failure.code) == (retryable, counts, code)
    assert failure.status == status
    assert str(failure) == f"upstream answered HTTP {status}"


def test_503_with_retry_after_is_rate_limiting() -> None:
    failure = _failures.status_failure(503, _headers(retry_after="3"), b"")
    assert failure.code == ErrorCode.UPSTREAM_RATE_LIMITED
    assert failure.retryable and failure.counts and failure.retry_after_s == 3.0
    # Retry-After only means something on 429 and 503.
    assert _failures.status_failure(500, _headers(retry_after="3"), b"").retry_after_s is None


@pytest.mark.parametrize(
    ("body", "label"),
    [
        (
            b'{"error": {"message": "key sk-canary", "type": "x", "code": "invalid_api_key"}}',
            "invalid_api_key",
        ),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "hi"}}',
            "overloaded_error",
        ),
        (b'{"error": {"type": "Bad Request Error!", "code": 400}}', None),
        (b'{"error": {"type": "' + b"a" * 65 + b'"}}', None),
        (b'{"error": "plain text"}', None),
        (b"<html>nope</html>", None),
    ],
)
def test_error_body_gives_at_most_a_tame_label(body: bytes, label: str | None) -> None:
    message = str(_failures.status_failure(400, httpx.Headers(), body))
    assert message == "upstream answered HTTP 400" + (f" ({label})" if label else "")
    assert "sk-canary" not in message


@pytest.mark.parametrize(
    ("error", "retryable", "counts", "code"),
    [
        ({"type": "overloaded_error"}, True, True, ErrorCode.UPSTREAM_ERROR),
        ({"type": "api_error"}, True, True, ErrorCode.UPSTREAM_ERROR),
        ({"type": "rate_limit_error"}, True, False, ErrorCode.UPSTREAM_RATE_LIMITED),
        ({"type": "invalid_request_error"}, False, False, ErrorCode.UPSTREAM_ERROR),
        ({"type": "authentication_error"}, False, True, ErrorCode.UPSTREAM_ERROR),
        ({"type": "BadRequestError", "code": 400}, False, False, ErrorCode.UPSTREAM_ERROR),
        ({"type": "something_new"}, True, True, ErrorCode.UPSTREAM_ERROR),
        ("not an object", True, True, ErrorCode.UPSTREAM_ERROR),
    ],
)
def test_in_stream_errors_are_classified_like_their_status(
    error: object, retryable: bool, counts: bool, code: ErrorCode
) -> None:
    failure = _failures.error_failure(error, what="upstream failed mid-stream")
    assert (failure.retryable, failure.counts, failure.code) == (retryable, counts, code)
    assert failure.status is None


@pytest.mark.parametrize(
    ("exc", "in_body", "message", "code", "retryable", "counts"),
    [
        (
            httpx.ConnectTimeout("x"),
            False,
            "connect timed out",
            ErrorCode.UPSTREAM_TIMEOUT,
            True,
            True,
        ),
        (httpx.ReadTimeout("x"), True, "read timed out", ErrorCode.UPSTREAM_TIMEOUT, True, True),
        (httpx.PoolTimeout("x"), False, "pool timed out", ErrorCode.UPSTREAM_TIMEOUT, True, False),
        (httpx.ConnectError("x"), False, "connection failed", ErrorCode.UPSTREAM_ERROR, True, True),
        (httpx.ReadError("x"), False, "connection broke", ErrorCode.UPSTREAM_ERROR, True, True),
        (httpx.ReadError("x"), True, "truncated", ErrorCode.UPSTREAM_ERROR, True, True),
        (
            httpx.RemoteProtocolError("x"),
            False,
            "HTTP protocol",
            ErrorCode.UPSTREAM_ERROR,
            True,
            True,
        ),
        (httpx.RemoteProtocolError("x"), True, "truncated", ErrorCode.UPSTREAM_ERROR, True, True),
        (
            httpx.LocalProtocolError(CANARY),
            False,
            "could not be sent",
            ErrorCode.UPSTREAM_ERROR,
            False,
            False,
        ),
    ],
)
def test_transport_errors(
    exc: httpx.HTTPError,
    in_body: bool,
    message: str,
    code: ErrorCode,
    retryable: bool,
    counts: bool,
) -> None:
    failure = _failures.transport_failure(exc, in_body=in_body)
    assert message in str(failure)
    assert (failure.code, failure.retryable, failure.counts) == (code, retryable, counts)
    assert CANARY not in str(failure)
