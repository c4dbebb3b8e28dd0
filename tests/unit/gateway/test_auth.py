"""Bearer token: constant-time check, env-only, never shown; open-bind warning."""

from __future__ import annotations

import pytest

from mpipeline.auth import BearerAuth, open_bind_warning
from mpipeline.errors import ConfigError

TOKEN = "s3cret-Token"


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"  BEARER   {TOKEN}  ", True),
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        (f"Basic {TOKEN}", False),
        (f"Bearer {TOKEN.lower()}", False),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        ("Bearer \xe9", False),
    ],
)
def test_allows_only_the_exact_token(header: str | None, allowed: bool) -> None:
    assert BearerAuth(TOKEN).allows(header) is allowed


def test_no_token_lets_everything_in() -> None:
    auth = BearerAuth.from_env(None, {})
    assert not auth.enabled
    assert auth.allows(None)


def test_token_comes_from_the_named_variable_and_is_never_shown() -> None:
    auth = BearerAuth.from_env("GW_TOKEN", {"GW_TOKEN": TOKEN})
    assert auth.enabled and auth.allows(f"Bearer {TOKEN}")
    assert TOKEN not in repr(auth) and TOKEN not in str(auth)


@pytest.mark.parametrize("environ", [{}, {"GW_TOKEN": ""}])
def test_named_but_unset_variable_refuses_to_start(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="GW_TOKEN, which is not set"):
        BearerAuth.from_env("GW_TOKEN", environ)


@pytest.mark.parametrize(
    ("host", "token", "warns"),
    [
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("10.1.2.3", None, True),
        ("0.0.0.0", TOKEN, False),
    ],
)
def test_open_bind_warning(host: str, token: str | None, warns: bool) -> None:
    warning = open_bind_warning(host, BearerAuth(token))
    assert (warning is not None) is warns
    if warning:
        assert host in warning
