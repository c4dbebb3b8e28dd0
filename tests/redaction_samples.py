"""Planted secrets of every kind post redacts, in random prose, split at random.

Shared by the hypothesis tests (tests/unit/stages/test_redact_stream.py), the
end-to-end test and the 100,000-stream leak run (bench/redact_leaks.py). Every
generator takes a ``random.Random`` so that a failing case replays from its seed.
Each secret is valid for its kind (cards pass Luhn, IBANs mod 97, SSNs the
SSA's rules), because an invalid one is rightly left alone.
"""

from __future__ import annotations

import random
import string

WORDS = (
    "the model said that we should call back later and ask about the order it was "
    "shipped on time but the box arrived damaged so please send a new one to our office "
    "Report Alpha ID is pending NASA and UK agreed on 12 points in 2023 version 4.2 costs "
    "15% more than v3 at 10:30 see section 7.1 and item (b) or ask Bearer questions"
).split()
PUNCTUATION = (" ", " ", " ", " ", ", ", ". ", "\n", "; ", ": ", "! ", " - ", " (", ") ")
# What separates a planted secret from the words around it: a break on both sides.
BEFORE = (" ", "\n", ": ", ", ", "; ", " (")
AFTER = (" ", "\n", ". ", ", ", "; ", ") ", "!")
_B62 = string.ascii_letters + string.digits


def _luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    prefix = rng.choice(("4", "51", "37", "6011"))
    length = 15 if prefix == "37" else 16
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    digits = body + _luhn_digit(body)
    sep = rng.choice(("", " ", "-"))
    if not sep:
        return digits
    groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    return sep.join(groups)


def iban(rng: random.Random) -> str:
    country, size = rng.choice((("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14)))
    bban = "".join(rng.choice(string.digits) for _ in range(size))
    if country in ("GB", "NL"):
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + bban[4:]
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    value = f"{country}{check:02d}{bban}"
    if rng.random() < 0.5:
        return " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return value


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def phone(rng: random.Random) -> str:
    def d(n: int) -> str:
        return "".join(rng.choice(string.digits) for _ in range(n))

    return rng.choice(
        (
            f"({d(3)}) {d(3)}-{d(4)}",
            f"{d(3)}-{d(3)}-{d(4)}",
            f"+1 {d(3)} {d(3)} {d(4)}",
            f"+44 {d(2)} {d(4)} {d(4)}",
            f"{d(3)}.{d(3)}.{d(4)}",
            f"+49{d(10)}",
        )
    )


def email(rng: random.Random) -> str:
    user = "".join(rng.choice(string.ascii_lowercase + "._") for _ in range(rng.randint(1, 10)))
    user = rng.choice(string.ascii_lowercase) + user
    host = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
    return f"{user}@{host}.{rng.choice(('com', 'io', 'co.uk', 'org'))}"


def ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(0, 255)) for _ in range(4))
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups)
    return ":".join(groups[:3]) + "::" + groups[-1]


def api_key(rng: random.Random) -> str:
    def b62(n: int) -> str:
        return "".join(rng.choice(_B62) for _ in range(n))

    return rng.choice(
        (
            f"sk-proj-{b62(40)}",
            f"sk-ant-api03-{b62(40)}",
            f"sk-{b62(32)}",
            f"ghp_{b62(36)}",
            f"github_pat_{b62(22)}_{b62(30)}",
            f"xoxb-{''.join(rng.choice(string.digits) for _ in range(12))}-{b62(24)}",
            "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
            f"AIza{b62(35)}",
            f"glpat-{b62(20)}",
            f"eyJ{b62(20)}.eyJ{b62(30)}.{b62(30)}",
        )
    )


def bearer(rng: random.Random) -> str:
    return "Bearer " + "".join(rng.choice(_B62 + "-._") for _ in range(rng.randint(24, 48)))


def secret(rng: random.Random) -> str:
    """A high-entropy string with letters and digits (what a generic key looks like)."""
    while True:
        value = "".join(rng.choice(_B62) for _ in range(rng.randint(28, 48)))
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return value


KINDS = {
    "email": email,
    "phone": phone,
    "card": card,
    "iban": iban,
    "ssn": ssn,
    "ip": ip,
    "api_key": api_key,
    "bearer": bearer,
    "secret": secret,
}


def prose(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        out.append(rng.choice(WORDS))
        out.append(rng.choice(PUNCTUATION))
    return "".join(out)


def planted_text(rng: random.Random, secrets: int) -> tuple[str, list[str]]:
    """Prose with ``secrets`` secrets of random kinds; returns the text and the
    secret part of each (for a bearer token, the token: "Bearer" is no secret)."""
    parts = [prose(rng, rng.randint(0, 12))]
    planted = []
    for _ in range(secrets):
        value = KINDS[rng.choice(list(KINDS))](rng)
        planted.append(value.removeprefix("Bearer "))
        parts += [rng.choice(BEFORE), value, rng.choice(AFTER), prose(rng, rng.randint(0, 12))]
    return "".join(parts), planted


def random_split(rng: random.Random, text: str, pieces: int) -> list[str]:
    """``text`` cut at ``pieces - 1`` random places (pieces may be empty)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(pieces - 1))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
