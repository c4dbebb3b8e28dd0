"""``[stages.post.redact]``: which PII and secrets post redacts from replies, and how.

Kept apart from ``tables.py`` (the stage tables) because it is a table of its
own with many entries; ``PostConfig.redact`` holds it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from mpipeline.config._base import _doc, _Table

__all__ = ["RedactConfig", "RedactPattern"]

_REDACT_ACTION = Literal["mask", "hash", "drop", "keep"]
_ACTION_DOC = (
    '"mask" writes [{kind}], "hash" [{kind}:<10 hex>] (a keyed hash: the same value gives '
    'the same tag for the whole run), "drop" removes it, "keep" does not look for it.'
)
_PATTERN_EXAMPLE = {"name": "employee_id", "regex": "EMP-[0-9]{6}", "action": "mask"}


class RedactPattern(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A pattern of your own to redact, matched inside one word."""

    name: Annotated[
        str,
        Meta(pattern=r"^[a-z0-9][a-z0-9_]{0,31}$"),
        _doc("Its placeholder: [name] (lower case, digits, _)."),
    ]
    regex: Annotated[str, Meta(min_length=1), _doc("A Python regular expression.")]
    action: Annotated[_REDACT_ACTION, _doc(_ACTION_DOC.replace("{kind}", "name"))] = "mask"


class RedactConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """PII and secrets in the model's output, masked, hashed or dropped (README: Redaction).

    Streams are redacted too: a value split across chunks is still caught, because
    post holds back the unfinished last word (or group of digits) until the next
    chunk shows it cannot become one.
    """

    enabled: Annotated[bool, _doc("true: redact every reply (off: no surprise rewriting).")] = False
    email: Annotated[_REDACT_ACTION, _doc("Email addresses. " + _ACTION_DOC)] = "mask"
    phone: Annotated[_REDACT_ACTION, _doc("Phone numbers: 10 to 15 digits, or 8+ after a +.")] = (
        "mask"
    )
    card: Annotated[
        _REDACT_ACTION, _doc("Payment card numbers: 13 to 19 digits that pass Luhn.")
    ] = "mask"
    iban: Annotated[_REDACT_ACTION, _doc("IBANs that pass the mod-97 check.")] = "mask"
    ssn: Annotated[_REDACT_ACTION, _doc("US social security numbers (123-45-6789).")] = "mask"
    ip: Annotated[_REDACT_ACTION, _doc("IPv4 and IPv6 addresses.")] = "mask"
    api_key: Annotated[
        _REDACT_ACTION,
        _doc(
            "Keys and tokens with a known provider prefix (sk-, sk-ant-, ghp_, github_pat_, "
            "xoxb-, AKIA, AIza, glpat-, JWTs) and the token after Bearer."
        ),
    ] = "mask"
    secret: Annotated[
        _REDACT_ACTION,
        _doc(
            "Other high-entropy strings: 24+ letters, digits, _ and -, with both letters "
            "and digits."
        ),
    ] = "mask"
    patterns: Annotated[
        list[RedactPattern],
        _doc(
            "Patterns of your own, each a [[stages.post.redact.patterns]] table; counted "
            'in metrics as kind "custom".',
            [_PATTERN_EXAMPLE],
        ),
    ] = []
    json_output: Annotated[
        bool,
        _doc(
            "Also rewrite replies the client asked to be JSON (response_format): off, "
            "since a masked number can break the document."
        ),
    ] = False
    hash_key_env: Annotated[
        str,
        Meta(pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$"),
        _doc(
            "Environment variable holding the hash action's key, to keep tags stable "
            'across runs (say MPIPELINE_REDACT_KEY). "": a key derived from the run id.'
        ),
    ] = ""
