"""Redaction: PII and secrets found in model output, masked, hashed or dropped.

A regular expression per entity finds candidates, each run only where its
entity can be (``_candidates``: most prose needs a few cheap hints and no
entity expression at all); the leftmost candidate wins, ties in the order of
``_PATTERNS``. Some are then checked in code, where a regex cannot (Luhn for
cards, mod 97 for IBANs, digit counts for phone numbers, ``ipaddress`` for
IPv6, entropy for generic secrets). A candidate that fails its check is left
as it is (a 16-digit number that fails Luhn is not a card), unless a part of
it between separators passes (a card written next to another number).

Why streaming is safe (``Redactor.split``): every pattern consumes only the
characters of ``WORD_CHARS`` plus a single space right after a digit, a
capital, ``)`` or the word ``Bearer`` (a card, an IBAN or a phone number in
groups; a bearer token). Any other character is a *break*: no match can
contain one, and no match attempt ever looks past one (lookarounds read one
character at most, and only word characters). So the text before the last
break is final: redacting it now gives what redacting the whole text would,
and only the tail after the last break (the shortest tail that can still
grow into a match) is held back. Prose breaks at nearly every space, so the
tail is usually the last, unfinished word; a chunk that ends in a break is
released whole, in the same step. User patterns are matched inside one word
(a run of ``WORD_CHARS``) for the same reason.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from typing import Final, Literal

from mpipeline.metrics.schema import REDACTION_KINDS

Action = Literal["mask", "hash", "drop", "keep"]

# The built-in entities, in the metrics' order (``custom`` counts user patterns).
ENTITIES: Final = REDACTION_KINDS[:-1]
# Every character a pattern may consume (besides the one space noted above).
WORD_CHARS: Final = r"A-Za-z0-9._%+\-@:/=~()"

_API_KEY = (
    r"(?<![A-Za-z0-9_\-])(?:"
    r"sk-ant-[A-Za-z0-9_\-]{20,}"
    r"|sk-(?:proj-|svcacct-)?[A-Za-z0-9_\-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abposr]-[A-Za-z0-9\-]{15,}"
    r"|AKIA[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_\-]{35}"
    r"|glpat-[0-9A-Za-z_\-]{20,}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"
    r")(?![A-Za-z0-9_\-])"
)
_BEARER = r"(?<![A-Za-z0-9])[Bb]earer [A-Za-z0-9._~+/\-]{20,}=*"
_EMAIL = (
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_SSN = r"(?<![0-9\-])\d{3}-\d{2}-\d{4}(?![0-9\-])"
# Any run of 13+ digits in groups; which groups make the card is checked in code.
_CARD = r"(?<![0-9])\d(?:[ \-]?\d){12,}"
_IBAN = (
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}"
    r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)(?![A-Za-z0-9])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP4 = rf"(?<![0-9A-Za-z.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9A-Za-z]|\.\d)"
_IP6 = r"(?<![0-9A-Za-z:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{3,39}(?![0-9A-Za-z:])"
_PHONE = (
    r"(?<![0-9A-Za-z+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?"
    r"\d{2,4}(?:[ .\-]?\d{2,4}){1,5}(?![0-9A-Za-z])"
)
_SECRET = r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{24,}(?![A-Za-z0-9_\-])"

# Group name -> pattern; at one position, the first in this order wins.
_PATTERNS: Final = (
    ("api_key", _API_KEY),
    ("bearer", _BEARER),
    ("email", _EMAIL),
    ("ssn", _SSN),
    ("card", _CARD),
    ("iban", _IBAN),
    ("ip", _IP4),
    ("ip6", _IP6),
    ("phone", _PHONE),
    ("secret", _SECRET),
)
_ORDER: Final = {name: i for i, (name, _) in enumerate(_PATTERNS)}
_ENTITY_OF: Final = {"bearer": "api_key", "ip6": "ip"}


def _family(*names: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?P<{n}>{p})" for n, p in _PATTERNS if n in names), re.ASCII)


# Families, each run only where it can match, since one big expression tried at
# every position costs ten times the budget (bench/micro/test_redact.py):
# tokens need a run of 20+ characters without whitespace; digit entities live in
# a cluster of digits and separators (7+ characters: 1.2.3.4 is the shortest);
# an email needs an @, an IBAN two capitals and two digits, IPv6 two colons.
_TOKENS: Final = _family("api_key", "bearer", "secret")
_EMAILS: Final = _family("email")
# Each its own scan, so that a number one rejects (a card failing Luhn) is
# still offered to the others (a phone number).
_NUMBERS: Final = tuple(_family(name) for name in ("ssn", "card", "ip", "phone"))
_IBANS: Final = _family("iban")
_IP6S: Final = _family("ip6")
# Written to start with a character class, which the regex engine skips to in C.
_LONG_RUN: Final = re.compile(r"\s\S{20,}")
_LONG_HEAD: Final = re.compile(r"\S{20,}")
_HINT: Final = re.compile(r"[0-9@:]")
_DIGIT: Final = re.compile(r"[0-9]")
_CLUSTER: Final = re.compile(r"[0-9][0-9 .\-()+]{6,}")
_IBAN_HINT: Final = re.compile(r"[A-Z][A-Z][0-9][0-9]")
_IP6_HINT: Final = re.compile(r":[0-9A-Fa-f]*:")

# A break: a character no pattern consumes, or a space no pattern consumes.
_BREAK: Final = rf"[^{WORD_CHARS} ]|(?<![0-9A-Z)])(?<![Bb][Ee][Aa][Rr][Ee][Rr]) "
_LAST_BREAK: Final = re.compile(rf"(?s:.*)(?:{_BREAK})")
_WORD: Final = re.compile(rf"[{WORD_CHARS}]+")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: 15 to 34 characters whose rearranged number is 1 mod 97."""
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def entropy_bits(text: str) -> float:
    """Shannon entropy per character, in bits."""
    n = len(text)
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _grouped(
    value: str, ok: Callable[[str], bool], prefixes_only: bool, seps: str = " -"
) -> tuple[int, int]:
    """The longest span of ``value`` between separators (or its ends) that passes
    ``ok``; (0, 0): none. A card or an IBAN
    written next to one more group of digits is matched with it, and its own
    groups are still found and redacted."""
    cuts = [i for i, ch in enumerate(value) if ch in seps]
    starts = [0] if prefixes_only else [0, *(i + 1 for i in cuts)]
    spans = [(lo, hi) for lo in starts for hi in (*cuts, len(value)) if 0 < hi - lo <= 48]
    spans.sort(key=lambda span: span[0] - span[1])
    for lo, hi in spans:
        if ok(value[lo:hi]):
            return lo, hi
    return 0, 0


def _card_ok(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _iban_ok(text: str) -> bool:
    return iban_ok(text.replace(" ", ""))


def _phone_ok(text: str) -> bool:
    n = len(_digits(text))
    return 10 <= n <= 15 or (text[:1] == "+" and 8 <= n <= 15)


def _marked_phone(text: str) -> bool:
    return (text[:1] in "+(" or "-" in text or "." in text) and _phone_ok(text)


def _valid(kind: str, value: str) -> tuple[int, int]:
    """Which span of a candidate is the entity: all of it, a part, or (0, 0): none."""
    whole = (0, len(value))
    if kind == "card":
        return whole if _card_ok(value) else _grouped(value, _card_ok, False)
    if kind == "iban":
        return whole if _iban_ok(value) else _grouped(value, _iban_ok, True)
    if kind == "phone":
        if _phone_ok(value):
            return whole
        # Followed by another number, a phone number written as one (+, parentheses,
        # dashes or dots) is still one; plain groups of digits are not.
        return _grouped(value, _marked_phone, True, " .-")
    if kind == "ssn":
        area, group, serial = value.split("-")
        bad = area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000"
        return (0, 0) if bad else whole
    if kind == "ip6":
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return 0, 0
        return whole
    if kind == "secret":
        has_digit = any(ch.isdigit() for ch in value)
        has_alpha = any(ch.isalpha() for ch in value)
        ok = has_digit and has_alpha and entropy_bits(value) >= 3.5
        return whole if ok else (0, 0)
    return whole


class CustomPattern:
    """A user's pattern: a name (its placeholder), a compiled regex and an action."""

    __slots__ = ("action", "name", "regex")

    def __init__(self, name: str, regex: str, action: Action) -> None:
        self.name = name
        self.regex = re.compile(regex)
        self.action = action


class Redactor:
    """Finds and rewrites entities in text; ``split`` is the streaming half.

    ``actions`` maps each built-in entity to what happens to it ("keep": not
    looked for). ``count`` is called with the entity of every redaction (the
    metrics counter); it never sees the value. ``key`` keys the hash action, so
    a value maps to the same tag for the whole run and to an unguessable one
    without the key.
    """

    def __init__(
        self,
        actions: dict[str, Action],
        custom: Sequence[CustomPattern] = (),
        key: bytes = b"",
        count: Callable[[str], None] | None = None,
    ) -> None:
        self._actions = {e: actions.get(e, "mask") for e in ENTITIES}
        self._actions.update({alias: self._actions[e] for alias, e in _ENTITY_OF.items()})
        self._builtin = any(a != "keep" for a in self._actions.values())
        self._custom = [c for c in custom if c.action != "keep"]
        self._key = key
        self._count = count

    def split(self, buf: str, held: int = 0) -> tuple[str, str]:
        """``(final, tail)``: the redacted text before ``buf``'s last break, and the
        raw rest to hold until more text comes (or the end). ``buf[:held]`` is the
        previous tail, known to hold no break, so the search starts after it."""
        m = _LAST_BREAK.match(buf, held)
        if m is None:
            return "", buf
        end = m.end()
        if end == len(buf):
            return self.redact(buf), ""
        return self.redact(buf[:end]), buf[end:]

    def redact(self, text: str, counted: bool = True) -> str:
        """The whole of ``text`` redacted, as final (the end of a stream, a result);
        ``counted=False``: without counting (text whose redactions were counted)."""
        if not counted:
            count, self._count = self._count, None
            try:
                return self.redact(text)
            finally:
                self._count = count
        if self._builtin:
            found = _candidates(text)
            if found:
                text = self._rewrite(text, found)
        if self._custom:
            text = _WORD.sub(self._custom_word, text)
        return text

    def _rewrite(self, text: str, found: list[re.Match[str]]) -> str:
        """Leftmost first (ties: ``_PATTERNS`` order), skipping what overlaps a
        redaction already made and what fails its check."""
        if len(found) > 1:
            found.sort(key=lambda m: (m.start(), _ORDER[m.lastgroup or ""]))
        parts = []
        done = 0
        for m in found:
            start = m.start()
            if start < done:
                continue
            replaced = self._replace(m)
            if replaced is None:
                continue
            parts.append(text[done:start])
            parts.append(replaced)
            done = m.end()
        if not parts:
            return text
        parts.append(text[done:])
        return "".join(parts)

    def _replace(self, m: re.Match[str]) -> str | None:
        kind = m.lastgroup
        assert kind is not None
        action = self._actions[kind]
        if action == "keep":
            return None
        value = m.group()
        lo, hi = _valid(kind, value)
        if hi == 0:
            return None
        entity = _ENTITY_OF.get(kind, kind)
        if kind == "bearer":  # keep the scheme, so the text still reads
            lo = 7
        return value[:lo] + self._apply(entity, action, value[lo:hi]) + value[hi:]

    def _custom_word(self, m: re.Match[str]) -> str:
        word = m.group()
        for c in self._custom:
            word = c.regex.sub(self._custom_replacer(c), word)
        return word

    def _custom_replacer(self, c: CustomPattern) -> Callable[[re.Match[str]], str]:
        def replace(found: re.Match[str]) -> str:
            return self._apply(c.name, c.action, found.group(), "custom")

        return replace

    def _apply(self, name: str, action: Action, value: str, entity: str = "") -> str:
        if self._count is not None:
            self._count(entity or name)
        if action == "drop":
            return ""
        if action == "hash":
            tag = hashlib.blake2b(value.encode(), key=self._key, digest_size=5).hexdigest()
            return f"[{name}:{tag}]"
        return f"[{name}]"


def _candidates(text: str) -> list[re.Match[str]]:
    """Every match of every family, each looked for only where it can be."""
    found: list[re.Match[str]] = []
    run = _LONG_HEAD.match(text)
    pos = 0
    while run is not None or (run := _LONG_RUN.search(text, pos)) is not None:
        start, pos = run.span()
        # From 7 characters before the run ("Bearer "), to one past it (lookaheads).
        found += _TOKENS.finditer(text, max(start - 7, 0), pos + 1)
        run = None
    hint = _HINT.search(text)
    if hint is None:
        return found
    if "@" in text:
        found += _EMAILS.finditer(text)
    if ":" in text and _IP6_HINT.search(text, hint.start()) is not None:
        found += _IP6S.finditer(text)
    digit = hint if text[hint.start()].isdigit() else _DIGIT.search(text, hint.start())
    if digit is None:
        return found
    pos = digit.start()
    if _IBAN_HINT.search(text, max(pos - 2, 0)) is not None:
        found += _IBANS.finditer(text)
    while (cluster := _CLUSTER.search(text, pos)) is not None:
        start, pos = cluster.span()
        while start and text[start - 1] in "+(":
            start -= 1
        for family in _NUMBERS:  # one character past the cluster: lookaheads read it
            found += family.finditer(text, start, pos + 1)
    return found
