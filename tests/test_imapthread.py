"""RFC 5256 THREAD (REFERENCES, ORDEREDSUBJECT) and the ``* THREAD`` rendering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import basesubject
from agentpost.mail.imapthread import (
    ThreadMessage,
    ThreadNode,
    normalize_msgid,
    render_threads,
    subject_info,
    thread_data,
    thread_orderedsubject,
    thread_references,
)
from tests.test_search_sort_keys import _LINEAR_RATIO, _python_lines

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def msg(number, message_id=None, refs=(), subject="topic", *, minutes=None, irt=(),
        sent=None):
    base, is_reply = subject_info(subject)
    when = sent or T0 + timedelta(minutes=number if minutes is None else minutes)
    return ThreadMessage(number, message_id, tuple(refs), tuple(irt), base, is_reply, when)


def refs_text(messages):
    return thread_data(thread_references(messages))


# --------------------------------------------------------------------------- ABNF check


def parse_thread_lists(text):
    """Parse 1*thread-list (RFC 5256 §4) strictly; returns the numbers in order."""
    numbers: list[int] = []
    pos = 0

    def number():
        nonlocal pos
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        assert pos > start and text[start] != "0", (text, start)
        numbers.append(int(text[start:pos]))

    def thread_list():
        nonlocal pos
        assert text[pos] == "(", (text, pos)
        pos += 1
        if text[pos] == "(":
            nested(min_lists=2)
        else:
            number()
            while text[pos] == " ":
                pos += 1
                if text[pos] == "(":
                    nested(min_lists=2)
                    break
                number()
        assert text[pos] == ")", (text, pos)
        pos += 1

    def nested(min_lists):
        count = 0
        while pos < len(text) and text[pos] == "(":
            thread_list()
            count += 1
        assert count >= min_lists, (text, pos)

    if text:
        nested(min_lists=1)
    assert pos == len(text), (text, pos)
    return numbers


def test_the_abnf_checker_accepts_the_rfc_examples_and_rejects_bad_lists():
    assert parse_thread_lists("(2)(3 6 (4 23)(44 7 96))") == [2, 3, 6, 4, 23, 44, 7, 96]
    assert parse_thread_lists("((3)(5))") == [3, 5]
    for bad in ("(3 (5))", "((3))", "(3 )", "()", "(0)", "(3)(", "3"):
        try:
            parse_thread_lists(bad)
        except (AssertionError, IndexError):
            continue
        raise AssertionError(f"accepted {bad!r}")


# --------------------------------------------------------------------------- REFERENCES


def test_references_reproduces_the_rfc_5256_example_tree():
    messages = [
        msg(2, "<a2@x>", subject="two"),
        msg(3, "<a3@x>", subject="three"),
        msg(6, "<a6@x>", ["<a3@x>"], "Re: three"),
        msg(4, "<a4@x>", ["<a3@x>", "<a6@x>"], "Re: three"),
        msg(23, "<a23@x>", ["<a6@x>", "<a4@x>"], "Re: three"),
        msg(44, "<a44@x>", ["<a6@x>"], "Re: three"),
        msg(7, "<a7@x>", ["<a44@x>"], "Re: three"),
        msg(96, "<a96@x>", ["<a44@x>", "<a7@x>"], "Re: three"),
    ]
    assert refs_text(messages) == "THREAD (2)(3 6 (4 23)(44 7 96))"


def test_no_messages_is_a_bare_thread_response():
    assert thread_data(thread_references([])) == "THREAD"
    assert thread_data(thread_orderedsubject([])) == "THREAD"


def test_siblings_under_a_missing_parent_keep_a_dummy_root():
    messages = [msg(3, "<b@x>", ["<gone@x>"], "one"), msg(5, "<c@x>", ["<gone@x>"], "two")]
    threads = thread_references(messages)
    assert threads[0].number is None
    assert refs_text(messages) == "THREAD ((3)(5))"


def test_a_dummy_with_one_child_is_promoted_and_childless_dummies_vanish():
    messages = [msg(1, "<a@x>", ["<gone1@x>", "<gone2@x>"], "one")]
    assert refs_text(messages) == "THREAD (1)"


def test_a_missing_message_inside_a_thread_is_spliced_out():
    messages = [
        msg(1, "<root@x>", subject="s"),
        msg(2, "<b@x>", ["<root@x>", "<gone@x>"], "Re: s"),
        msg(3, "<c@x>", ["<root@x>", "<gone@x>"], "Re: s"),
    ]
    assert refs_text(messages) == "THREAD (1 (2)(3))"


def test_in_reply_to_is_used_only_without_valid_references():
    messages = [
        msg(1, "<p@x>", subject="a"), msg(2, "<q@x>", subject="b"),
        msg(3, "<r@x>", ["not-an-id"], "c", irt=["<p@x>", "<q@x>"]),
        msg(4, "<s@x>", ["<q@x>"], "d", irt=["<p@x>"]),
    ]
    assert refs_text(messages) == "THREAD (1 3)(2 4)"


def test_a_later_message_fixes_a_truncated_references_chain():
    # 2 claims m1 -> m2 -> 2, but m2 (message 3) says it has no parent: 1B breaks the
    # m1 -> m2 link that 2's References made.
    messages = [msg(1, "<m1@x>", subject="a"), msg(2, "<m3@x>", ["<m1@x>", "<m2@x>"], "b"),
                msg(3, "<m2@x>", [], "c")]
    assert refs_text(messages) == "THREAD (1)(3 2)"


def test_reference_loops_are_not_followed():
    mutual = [msg(1, "<a@x>", ["<b@x>"], "one"), msg(2, "<b@x>", ["<a@x>"], "two")]
    assert refs_text(mutual) == "THREAD (2 1)"
    self_ref = [msg(1, "<a@x>", ["<a@x>"], "one")]
    assert refs_text(self_ref) == "THREAD (1)"
    cycle = [msg(1, "<a@x>", ["<c@x>", "<b@x>"], "x"), msg(2, "<b@x>", ["<a@x>", "<c@x>"], "y"),
             msg(3, "<c@x>", ["<b@x>", "<a@x>"], "z")]
    assert sorted(parse_thread_lists(render_threads(thread_references(cycle)))) == [1, 2, 3]


def test_duplicate_message_ids_keep_the_first_and_give_the_others_unique_ids():
    messages = [
        msg(1, "<dup@x>", subject="first"),
        msg(2, "<dup@x>", subject="second"),
        msg(3, "<r@x>", ["<dup@x>"], "Re: first"),
    ]
    assert refs_text(messages) == "THREAD (1 3)(2)"


def test_messages_without_a_valid_message_id_are_threaded_alone():
    messages = [msg(1, None, subject="a"), msg(2, "no-at-sign", subject="b"),
                msg(3, "<>", subject="c")]
    assert refs_text(messages) == "THREAD (1)(2)(3)"


def test_message_ids_are_normalised_then_compared_case_sensitively():
    assert normalize_msgid('<"01KF8JCEOCBS0045PS"@xxx.yyy.com>') == \
        normalize_msgid("<01KF8JCEOCBS0045PS@xxx.yyy.com>") == "01KF8JCEOCBS0045PS@xxx.yyy.com"
    assert normalize_msgid('"a\\"b"@c') == 'a"b@c'
    assert normalize_msgid(" <a@b\r\n >") == "a@b"
    for bad in (None, "", "<nodomain>", "<@x>", "<a@>", "<a@b", '"open@x', "<a@<b>"):
        assert normalize_msgid(bad) is None, bad
    quoted = [msg(1, '<"p"@x>', subject="a"), msg(2, "<q@x>", ["<p@x>"], "b")]
    assert refs_text(quoted) == "THREAD (1 2)"
    cased = [msg(1, "<P@x>", subject="a"), msg(2, "<q@x>", ["<p@x>"], "b")]
    assert refs_text(cased) == "THREAD (1)(2)"


def test_threads_with_the_same_base_subject_are_grouped():
    replies = [msg(1, "<a@x>", subject="Lunch"), msg(2, "<b@x>", subject="Re: lunch"),
               msg(3, "<c@x>", subject="Fwd: LUNCH")]
    assert refs_text(replies) == "THREAD (1 (2)(3))"
    originals = [msg(1, "<a@x>", subject="Lunch"), msg(2, "<b@x>", subject="lunch")]
    assert refs_text(originals) == "THREAD ((1)(2))"
    reply_first = [msg(1, "<a@x>", subject="Re: Lunch"), msg(2, "<b@x>", subject="Lunch")]
    assert refs_text(reply_first) == "THREAD (2 1)"
    blank = [msg(1, "<a@x>", subject=""), msg(2, "<b@x>", subject="Re:")]
    assert refs_text(blank) == "THREAD (1)(2)"


def test_a_dummy_thread_absorbs_other_threads_with_its_subject():
    messages = [
        msg(1, "<a@x>", ["<gone@x>"], "Plan"), msg(2, "<b@x>", ["<gone@x>"], "Re: Plan"),
        msg(3, "<c@x>", subject="plan"),
        msg(4, "<d@x>", ["<gone2@x>"], "Re: plan"), msg(5, "<e@x>", ["<gone2@x>"], "Re: plan"),
    ]
    assert refs_text(messages) == "THREAD ((1)(2)(3)(4)(5))"


def test_siblings_and_threads_sort_by_sent_date_then_number():
    late, early = T0 + timedelta(days=2), T0 - timedelta(days=2)
    messages = [
        msg(1, "<r@x>", subject="root", sent=T0),
        msg(2, "<a@x>", ["<r@x>"], "Re: root", sent=late),
        msg(3, "<b@x>", ["<r@x>"], "Re: root", sent=early),
        msg(4, "<c@x>", ["<r@x>"], "Re: root", sent=early),
        msg(5, "<other@x>", subject="other", sent=T0 - timedelta(days=9)),
    ]
    assert refs_text(messages) == "THREAD (5)(1 (3)(4)(2))"
    tz = timezone(timedelta(hours=5))
    zoned = [msg(1, "<a@x>", subject="a", sent=datetime(2024, 3, 1, 16, 0, tzinfo=tz)),
             msg(2, "<b@x>", subject="b", sent=datetime(2024, 3, 1, 12, 0, tzinfo=UTC))]
    assert refs_text(zoned) == "THREAD (1)(2)"  # 11:00Z before 12:00Z


def test_from_fields_falls_back_to_the_internal_date_and_reads_the_subject():
    record = ThreadMessage.from_fields(7, message_id="<a@x>", references=["<b@x>"],
                                       in_reply_to="<c@x>", subject="Re: [list] Hello",
                                       sent_at=None, internal_date=T0)
    assert (record.sent, record.base_subject, record.is_reply, record.in_reply_to) == \
        (T0, "Hello", True, ("<c@x>",))


def test_subject_info_notes_reply_and_forward_markers():
    cases = {
        "Hello": ("Hello", False), "Re: Hello": ("Hello", True), "[list] Hello": ("Hello", False),
        "[list] Re: Hello": ("Hello", True), "Hello (fwd)": ("Hello", True),
        "[Fwd: Hello]": ("Hello", True), "FW: Hello": ("Hello", True), "[a]": ("[a]", False),
        "": ("", False), "Re:": ("", True), "  Hello  ": ("Hello", False),
        "[fwd:[]]]]": ("]]", True), "[fwd:]": ("", True), "[a] [b]": ("[b]", False),
        " \t ": ("", False),
    }
    for subject, expected in cases.items():
        assert subject_info(subject) == expected, subject


def _tracked_base_subject(subject):
    """Oracle: basesubject's own loop, noting whether a reply/forward marker went."""
    s = basesubject._collapse(subject)
    lo, hi, marked, no_leader_before = 0, len(s), False, -1
    while True:
        while hi > lo:
            if s[hi - 1] == " ":
                hi -= 1
            elif hi - lo >= 5 and s[hi - 5:hi].lower() == "(fwd)":
                hi, marked = hi - 5, True
            else:
                break
        while True:
            if lo < hi and s[lo] == " ":
                lo += 1
                continue
            if lo > no_leader_before:
                pos = lo
                while (after := basesubject._blob_end(s, pos, hi)) is not None:
                    pos = after
                refwd = basesubject._refwd_end(s, pos, hi)
                if refwd is not None:
                    lo, marked = refwd, True
                    continue
                no_leader_before = pos if pos > lo else -1
            after = basesubject._blob_end(s, lo, hi)
            if after is not None and after < hi:
                lo = after
                continue
            break
        if hi - lo >= 6 and s[lo:lo + 5].lower() == "[fwd:" and s[hi - 1] == "]":
            lo, hi, marked, no_leader_before = lo + 5, hi - 1, True, -1
            continue
        return s[lo:hi], marked


_SUBJECT_TOKENS = st.sampled_from(["Re", "re", "Fw", "FWD", "fwd", ":", " ", "\t", "[",
                                   "]", "(fwd)", "[fwd:", "[Fwd: ", "x", "a b", "(", ")"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_SUBJECT_TOKENS, max_size=14).map("".join))
def test_subject_info_agrees_with_the_extraction_it_summarises(subject):
    assert _tracked_base_subject(subject)[0] == basesubject.base_subject(subject)
    assert subject_info(subject) == _tracked_base_subject(subject)


def test_a_100000_message_reply_chain_threads_without_recursion():
    n = 100_000
    chain = [msg(1, "<m1@x>", subject="deep")] + [
        msg(i, f"<m{i}@x>", subject="Re: deep", irt=[f"<m{i - 1}@x>"]) for i in range(2, n + 1)]
    text = render_threads(thread_references(chain))
    assert text == "(" + " ".join(str(i) for i in range(1, n + 1)) + ")"
    # Children numbered before their parents (the chain arrived backwards).
    backwards = [msg(n + 1 - i, f"<m{i}@x>", subject="deep", irt=[f"<m{i - 1}@x>"] if i > 1
                     else []) for i in range(1, n + 1)]
    assert render_threads(thread_references(backwards)).startswith(f"({n} {n - 1} ")

    def threading_of_a_chain(k):
        c = [msg(1, "<m1@x>", subject="deep")] + [
            msg(i, f"<m{i}@x>", subject="Re: deep", irt=[f"<m{i - 1}@x>"])
            for i in range(2, k + 1)]
        return _python_lines(lambda: render_threads(thread_references(c)))

    # linear: four times the chain, about four times the lines executed (not sixteen)
    assert threading_of_a_chain(10_000) / threading_of_a_chain(2_500) <= _LINEAR_RATIO


def test_long_references_chains_with_a_loop_back_stay_fast():
    n = 20_000
    messages = [msg(i, f"<m{i}@x>", [f"<m{j}@x>" for j in range(max(1, i - 50), i)] +
                    [f"<m{n}@x>"], "s") for i in range(1, n + 1)]
    numbers = parse_thread_lists(render_threads(thread_references(messages)))
    assert sorted(numbers) == list(range(1, n + 1))

    def threading_of_looped_chains(k):
        m = [msg(i, f"<m{i}@x>", [f"<m{j}@x>" for j in range(max(1, i - 50), i)] +
                 [f"<m{k}@x>"], "s") for i in range(1, k + 1)]
        return _python_lines(lambda: render_threads(thread_references(m)))

    # linear in the messages (50 references each): lines executed, not seconds
    assert threading_of_looped_chains(4_000) / threading_of_looped_chains(1_000) \
        <= _LINEAR_RATIO


# --------------------------------------------------------------------------- ORDEREDSUBJECT


def test_orderedsubject_groups_by_base_subject_and_orders_by_first_message():
    messages = [
        msg(1, subject="beta", minutes=5), msg(2, subject="Re: alpha", minutes=1),
        msg(3, subject="alpha", minutes=3), msg(4, subject="Re: beta", minutes=2),
        msg(5, subject="gamma", minutes=4), msg(6, subject="re: ALPHA", minutes=6),
        msg(7, subject="delta", minutes=7), msg(8, subject="Fwd: delta", minutes=8),
    ]
    assert thread_data(thread_orderedsubject(messages)) == \
        "THREAD (2 (3)(6))(4 1)(5)(7 8)"


# --------------------------------------------------------------------------- rendering


def test_render_flattens_chains_and_nests_branches():
    tree = ThreadNode(3, [ThreadNode(6, [ThreadNode(4, [ThreadNode(23)]),
                                         ThreadNode(44, [ThreadNode(7, [ThreadNode(96)])])])])
    assert render_threads([ThreadNode(2), tree]) == "(2)(3 6 (4 23)(44 7 96))"
    assert render_threads([ThreadNode(None, [ThreadNode(3), ThreadNode(5)])]) == "((3)(5))"
    assert render_threads([ThreadNode(None, [ThreadNode(3)])]) == "(3)"
    assert render_threads([ThreadNode(None)]) == ""


# --------------------------------------------------------------------------- properties


_IDS = [f"<id{i}@x>" for i in range(8)] + ["junk", '<"id1"@x>']


@st.composite
def mailboxes(draw):
    count = draw(st.integers(0, 25))
    numbers = draw(st.lists(st.integers(1, 10_000), min_size=count, max_size=count,
                            unique=True))
    out = []
    for number in numbers:
        out.append(msg(
            number,
            draw(st.sampled_from([None, *_IDS])),
            draw(st.lists(st.sampled_from(_IDS), max_size=5)),
            draw(st.sampled_from(["a", "Re: a", "b", "Fwd: b", "", "[l] a", "a (fwd)"])),
            minutes=draw(st.integers(0, 5)),
            irt=draw(st.lists(st.sampled_from(_IDS), max_size=2)),
        ))
    return out


def _dummies_only_on_top(threads):
    stack = [child for root in threads for child in root.children]
    while stack:
        node = stack.pop()
        assert node.number is not None
        stack.extend(node.children)
    for root in threads:
        assert root.number is not None or len(root.children) >= 2


@settings(max_examples=400, deadline=None)
@given(mailboxes())
def test_every_message_appears_once_in_a_valid_thread_list(messages):
    expected = sorted(m.number for m in messages)
    for algorithm in (thread_references, thread_orderedsubject):
        threads = algorithm(messages)
        _dummies_only_on_top(threads)
        assert sorted(parse_thread_lists(render_threads(threads))) == expected
        # Input order does not matter.
        assert render_threads(algorithm(list(reversed(messages)))) == render_threads(threads)



def _naive_parents(messages):
    """Oracle for step 1: the RFC's words, with a plain walk up the parents for loops.
    Returns {message number: parent}, a parent being ("msg", number) or ("dummy", id)."""
    parent: dict[str, str | None] = {}
    number_of: dict[str, int] = {}

    def link(up, down):
        node = up
        while node is not None:
            if node == down:
                return
            node = parent[node]
        parent[down] = up

    for m in sorted(messages, key=lambda m: m.number):
        refs = [r for r in map(normalize_msgid, m.references) if r] or \
            [r for r in map(normalize_msgid, m.in_reply_to) if r][:1]
        previous = None
        for ref in refs:
            parent.setdefault(ref, None)
            if previous is not None and parent[ref] is None:
                link(previous, ref)
            previous = ref
        own = normalize_msgid(m.message_id)
        if own is None or own in number_of:
            own = f"<unique {m.number}>"
        number_of[own] = m.number
        parent[own] = None
        if previous is not None:
            link(previous, own)

    def describe(key):
        if key is None:
            return None
        return ("msg", number_of[key]) if key in number_of else ("dummy", key)

    return {number: describe(parent[key]) for key, number in number_of.items()}


@settings(max_examples=300, deadline=None)
@given(mailboxes())
def test_step_one_links_match_a_naive_parent_walk(messages):
    from agentpost.mail.imapthread import _Links

    links = _Links()
    for m in sorted(messages, key=lambda m: m.number):
        links.add(m)
    dummy_ids = {id(box): msgid for msgid, box in links.by_id.items()}

    def describe(box):
        if box is None:
            return None
        return ("msg", box.msg.number) if box.msg else ("dummy", dummy_ids[id(box)])

    fast = {box.msg.number: describe(box.parent) for box in links.boxes if box.msg}
    assert fast == _naive_parents(messages)
