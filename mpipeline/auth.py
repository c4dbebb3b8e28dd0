"""Bearer-token check for the gateway and /metrics (RELIABILITY scenarios 36 and 37).

The token comes from the environment variable that ``gateway.auth_token_env``
names, never from the config file. It is compared with ``hmac.compare_digest``
so the time a refusal takes says nothing about how much of a guess was right,
and it is held in an object whose repr never shows it. A config that names a
variable which is unset or empty refuses to start rather than serve openly.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping

from mpipeline.errors import ConfigError

_LOOPBACK_NAMES = ("localhost",)


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` (or the token as ``x-api-key``); with no
    token, lets everything in."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @classmethod
    def from_env(cls, name: str | None, environ: Mapping[str, str] | None = None) -> BearerAuth:
        """The check for the variable ``name``; no name means no token is needed.

        :raises ConfigError: when ``name`` is set but the variable is unset or empty
        """
        if name is None:
            return cls(None)
        token = (os.environ if environ is None else environ).get(name, "")
        if not token:
            raise ConfigError(
                f"gateway.auth_token_env names {name}, which is not set (or is empty): "
                "refusing to serve without the token it asks for"
            )
        return cls(token)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, authorization: str | None) -> bool:
        """True for the right token; the scheme is case-insensitive, the token is not."""
        if self._token is None:
            return True
        if authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Header values arrive as latin-1 text: this gives back the bytes sent.
        sent = credentials.strip().encode("latin-1", "replace")
        return hmac.compare_digest(sent, self._token)

    def allows_key(self, api_key: str | None) -> bool:
        """True for the right token sent bare, as Anthropic's SDK sends it (``x-api-key``)."""
        if self._token is None:
            return True
        if api_key is None:
            return False
        return hmac.compare_digest(api_key.strip().encode("latin-1", "replace"), self._token)

    def __repr__(self) -> str:
        return f"BearerAuth(enabled={self.enabled})"


def open_bind_warning(host: str, auth: BearerAuth, what: str = "gateway") -> str | None:
    """A warning when ``what`` listens beyond loopback with no token, else None."""
    if auth.enabled or _is_loopback(host):
        return None
    return f"{what} listens on {host} with no auth token: anyone who can reach it can use it"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_NAMES
