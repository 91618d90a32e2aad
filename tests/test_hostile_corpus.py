"""The hostile corpus (tests/hostile/corpus.json) against a real server: every case gets
exactly the typed error it lists (or, for inert data, its result), and after EACH case the
same connection still serves a clean request whose answer equals local TL's."""
from __future__ import annotations

import pytest

from hookwire.client import Connection
from hostile.runner import PAYLOAD_MARKER, check, load_corpus, resident_ids, run_case
from known_good import assert_good, good_graph

CASES = load_corpus()
ISSUE_ITEMS = ("unknown ops", "Python internals", "pickle payloads", "torch.save payloads",
               "headers lying about dtype", "headers lying about shape",
               "headers lying about offsets", "cyclic graphs", "dangling references",
               "10^6-node graphs", "deeply nested", "memory bombs by shape",
               "memory bombs by expand+contiguous", "memory bombs by repeated cat",
               "memory bombs by constants", "memory bombs by saves", "NaN/Inf",
               "integer overflow in shapes", "non-existent sites", "wrong shape writes",
               "wrong dtype writes", "module parameters or buffers",
               "another user's resident values", "unicode strings", "oversized strings")


@pytest.fixture(scope="module")
def ids(server, tokens):
    """Resident ids: one of the test connection's user, two of another user."""
    mine, other = Connection(server.url), Connection(server.url)
    try:
        yield mine, resident_ids(mine, other, good_graph("tiny-gpt2"), tokens)
    finally:
        other.close()
        mine.close()


def test_corpus_covers_the_issue_list():
    covered = " / ".join(c["covers"] for c in CASES)
    assert [item for item in ISSUE_ITEMS if item not in covered] == []
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[c["name"][:60] for c in CASES])
def test_hostile_case_then_the_connection_serves(ids, good_answers, tokens, case):
    conn, resident = ids
    marker_before = PAYLOAD_MARKER.exists()
    check(case, run_case(conn, case, tokens, resident))
    assert_good(conn, good_answers, tokens)
    assert PAYLOAD_MARKER.exists() == marker_before, "a payload was unpickled"
    assert not PAYLOAD_MARKER.exists()
