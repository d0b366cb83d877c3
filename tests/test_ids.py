"""Prefixed ULIDs (agentpost.model.ids): the spelling, the time order, fresh randomness
in a forked child."""

from __future__ import annotations

import os

import pytest

from agentpost.model import ids

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _reference(prefix: str, ms: int, random_bytes: bytes) -> str:
    """The ULID spelled five bits at a time, as the specification describes it."""
    value = (ms << 80) | int.from_bytes(random_bytes, "big")
    return prefix + "_" + "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in range(25, -1, -1))


def test_spelling_matches_the_ulid_specification():
    for ms in (0, 1, 1_700_000_000_000, (1 << 48) - 1):
        for random_bytes in (bytes(10), b"\xff" * 10, os.urandom(10)):
            ids._random[:0] = random_bytes  # the next id takes exactly these bytes
            made = ids.new_id("msg", ms)
            assert made == _reference("msg", ms, random_bytes)
            assert ids.is_id(made, "msg") and not ids.is_id(made, "thr")


def test_ids_sort_by_time_and_do_not_repeat():
    made = [ids.new_id("evt", 1_700_000_000_000 + n // 10) for n in range(5000)]
    assert len(set(made)) == 5000
    assert [m[4:14] for m in made] == sorted(m[4:14] for m in made)  # the time part
    with pytest.raises(ValueError):
        ids.new_id("xyz")


def test_threads_never_share_random_bytes():
    """Ids made at the same millisecond in many threads at once are all different."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: ids.new_id("msg", 1), range(20000)))
    assert len(set(made)) == 20000


def test_a_forked_child_does_not_reuse_the_parents_random_bytes():
    ids.new_id("msg")  # the buffer now holds unused bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave at once
        os.close(read)
        os.write(write, ids.new_id("msg", 0).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert ids.is_id(child, "msg")
    assert child != ids.new_id("msg", 0)  # the parent's next bytes went unused in the child
