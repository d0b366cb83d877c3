"""The reply extractor: new text above the quoted history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail.reply import _ATTRIBUTION, _SEPARATOR, extract_new_text


def _oracle(text: str | None) -> str | None:
    """The first, list-of-lines implementation: simple enough to trust."""
    if text is None:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    cut = len(lines)
    for i, line in enumerate(lines):
        if _ATTRIBUTION.match(line) or _SEPARATOR.match(line):
            cut = i
            break
        if i + 1 < len(lines) and line.strip().startswith("On ") and \
                lines[i + 1].strip().endswith("wrote:"):
            cut = i
            break
    kept = lines[:cut]
    while kept and (kept[-1].strip() == "" or kept[-1].lstrip().startswith(">")):
        kept.pop()
    return "\n".join(kept).strip()


_LINES = st.sampled_from([
    "Hello there", "", "  ", "> quoted", "  >> deep", "On Mon, Ann <a@b> wrote:",
    "On Tuesday Bob", "wrote:", "-----Original Message-----", "From: x@y", "Le lundi, a écrit :",
    "__________", "text\r", "\r", "> q\r", "Am Montag schrieb Eva:",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINES, max_size=12), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_extract_new_text_matches_the_simple_version(lines, sep, trailing):
    text = sep.join(lines) + (sep if trailing else "")
    assert extract_new_text(text) == _oracle(text)


def test_examples():
    assert extract_new_text(None) is None
    assert extract_new_text("Thanks!\n\nOn Mon, Ann <a@b> wrote:\n> hi\n") == "Thanks!"
    assert extract_new_text("Sure\r\n> old\r\n> older\r\n") == "Sure"
    assert extract_new_text("Top\nOn Tue, Bob\n<b@c> wrote:\n> x") == "Top"
    big = "word " * 2_000_000
    assert extract_new_text(big) == big.strip()
