"""RequestOptions: one type for a request's options, given whole or as keywords."""

from __future__ import annotations

import pytest

from mpipeline.messages import Priority, Turn
from mpipeline.pipeline import RequestOptions
from mpipeline.pipeline._options import DEFAULT, merged


def test_keywords_build_the_options_and_override_given_ones() -> None:
    assert merged(None, {}) is DEFAULT
    opts = RequestOptions(session_id="s", priority=Priority.LOW, max_tokens=4)
    assert merged(opts, {}) is opts
    assert merged(None, {"session_id": "s", "max_tokens": 4}) == RequestOptions(
        session_id="s", max_tokens=4
    )
    turns = [Turn(role="user", content="hi")]
    both = merged(opts, {"priority": Priority.CRITICAL, "history": turns})
    assert both == RequestOptions(
        session_id="s", priority=Priority.CRITICAL, max_tokens=4, history=turns
    )
    assert opts.priority is Priority.LOW  # frozen: the given options are not changed


def test_an_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="sesion_id"):
        merged(None, {"sesion_id": "s"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(TypeError, match="sesion_id"):
        merged(RequestOptions(), {"sesion_id": "s"})  # type: ignore[typeddict-unknown-key]
