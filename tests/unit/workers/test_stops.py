"""Stop sequences in the local workers' text, even split across pieces."""

from __future__ import annotations

import pytest

from mpipeline.workers._stops import StopScanner


@pytest.mark.parametrize(
    ("stops", "pieces", "out", "stopped"),
    [
        ([], ["a", "b"], "ab", False),
        (["END"], ["hello E", "N", "D more"], "hello ", True),
        (["END"], ["hello E", "Nx"], "hello ENx", False),
        (["x", "abc"], ["zab", "cx"], "z", True),
        (["\n\n"], ["one\n", "\ntwo"], "one", True),
        ([""], ["a"], "a", False),
        # Shorter pieces than the longest stop are held, not split.
        (["STOP"], ["a", "b", "S", "T", "O", "P", "c"], "ab", True),
        (["STOP"], ["a", "b", "S", "T", "c"], "abSTc", False),
    ],
)
def test_stop_scanner_cuts_across_pieces(
    stops: list[str], pieces: list[str], out: str, stopped: bool
) -> None:
    scanner = StopScanner(stops)
    got = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    assert (got, scanner.stopped) == (out, stopped)
