"""Redaction detectors: what each entity catches, what it rightly leaves alone, the actions."""

from __future__ import annotations

import pytest

from mpipeline.stages.redact import (
    CustomPattern,
    Redactor,
    entropy_bits,
    iban_ok,
    luhn_ok,
)

R = Redactor({})


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mail jane.doe+x@mail.example.co.uk now", "mail [email] now"),
        ("(bob@x.io)", "([email])"),
        ("card 4111 1111 1111 1111.", "card [card]."),
        ("card 4111-1111-1111-1111", "card [card]"),
        ("card 378282246310005", "card [card]"),
        ("year 2023 4111 1111 1111 1111 ok", "year 2023 [card] ok"),
        ("iban DE89 3704 0044 0532 0130 00 ok", "iban [iban] ok"),
        ("iban GB82WEST12345698765432", "iban [iban]"),
        ("ssn 123-45-6789.", "ssn [ssn]."),
        ("call (555) 123-4567 or +1 555 123 4567", "call [phone] or [phone]"),
        ("call +44 20 7946 0958", "call [phone]"),
        ("host 192.168.1.10, ", "host [ip], "),
        ("v6 2001:db8::8a2e:370:7334 and ::1", "v6 [ip] and [ip]"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "key [api_key]"),
        ("key sk-ant-api03-abcdefghijklmnopqrstuvwx", "key [api_key]"),
        ("tok ghp_abcdefghijklmnopqrstuvwxyz0123456789", "tok [api_key]"),
        ("tok github_pat_11ABCDEFG0123456789_abcdefghijkl", "tok [api_key]"),
        ("tok xoxb-123456789012-abcdefghijkl", "tok [api_key]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [api_key]"),
        ("g AIzaSyA1234567890abcdefghijklmnopqrstuv", "g [api_key]"),
        ("gl glpat-abcdefghij0123456789", "gl [api_key]"),
        ("jwt eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4f", "jwt [api_key]"),
        ("Authorization: Bearer abc123def456ghi789jkl012", "Authorization: Bearer [api_key]"),
        ("token 9f8e7d6c5b4a39281706f5e4d3c2b1a0", "token [secret]"),
    ],
)
def test_each_entity_is_found(text: str, want: str) -> None:
    assert R.redact(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "a 16-digit number that fails Luhn: 4111 1111 1111 1112",
        "an IBAN with a wrong check: DE00 3704 0044 0532 0130 00",
        "ssns the SSA never issues: 000-12-3456, 666-12-3456, 900-12-3456, 123-00-4567",
        "short numbers: 2023, 4.2, 15%, 10:30, 12:30:45, 2023-10-05, 555-1234",
        "not an address: 256.1.1.1 or 1.2.3 and words: a:b",
        "long words: internationalization_and_localization counterrevolutionaries",
        "identifiers without digits: abcdefghijklmnopqrstuvwxyzABCD",
        "low entropy: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1",
        "a sk- that is too short: sk-abc123",
        "Bearer short",
        "",
    ],
)
def test_false_positives_are_left_alone(text: str) -> None:
    assert R.redact(text) == text


def test_checks() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE88370400440532013000")
    assert not iban_ok("DE89")
    assert entropy_bits("aaaa") == 0.0
    assert entropy_bits("abcd") == 2.0


def test_actions_mask_hash_drop_keep() -> None:
    text = "a@b.co and c@d.co and a@b.co"
    hashed = Redactor({"email": "hash"}, key=b"k").redact(text)
    tags = hashed.split(" and ")
    assert tags[0] == tags[2] != tags[1]
    assert tags[0].startswith("[email:") and len(tags[0]) == len("[email:]") + 10
    # Another key, another tag: the tag says nothing without the key.
    assert Redactor({"email": "hash"}, key=b"other").redact(text) != hashed
    assert Redactor({"email": "drop"}).redact(text) == " and  and "
    assert Redactor({"email": "keep"}).redact(text) == text
    assert Redactor({"email": "mask"}).redact(text) == "[email] and [email] and [email]"


def test_keep_on_one_entity_leaves_the_others() -> None:
    r = Redactor({"ip": "keep"})
    assert r.redact("1.2.3.4 ::1 a@b.co") == "1.2.3.4 ::1 [email]"


def test_custom_patterns_match_inside_a_word() -> None:
    r = Redactor(
        dict.fromkeys(("email", "phone", "card", "iban", "ssn", "ip", "api_key", "secret"), "keep"),
        [CustomPattern("employee", r"EMP-\d{6}", "mask"), CustomPattern("x", "zz", "drop")],
    )
    assert r.redact("id EMP-123456, id=EMP-654321 and EMP-12 buzz") == (
        "id [employee], id=[employee] and EMP-12 bu"
    )


def test_counts_by_entity_never_the_value() -> None:
    seen: list[str] = []
    r = Redactor({}, [CustomPattern("emp", r"EMP-\d+", "mask")], count=seen.append)
    r.redact("a@b.co 1.2.3.4 EMP-1 Bearer abcdefghij0123456789xyz 4111111111111111")
    assert sorted(seen) == ["api_key", "card", "custom", "email", "ip"]
    r.redact("a@b.co", counted=False)
    assert len(seen) == 5


@pytest.mark.parametrize(
    ("buf", "final", "tail"),
    [
        ("hello there. ", "hello there. ", ""),  # ends in a break: nothing held
        ("hello wor", "hello ", "wor"),  # the unfinished word could become an email
        ("card 4111 1111", "card ", "4111 1111"),  # digits then a space: not a break
        ("key: Bearer ", "key: ", "Bearer "),  # the token comes next
        ("see ya!", "see ya!", ""),
        ("spaces after lower case break", "spaces after lower case ", "break"),
    ],
)
def test_split_holds_only_the_tail_that_can_grow(buf: str, final: str, tail: str) -> None:
    assert R.split(buf) == (final, tail)
