"""RFC 3516 BINARY: Content-Transfer-Encoding decoding and BINARY.SIZE."""

from __future__ import annotations

import base64
import binascii
import quopri
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import binary
from agentpost.mail.binary import (
    InvalidTransferEncoding,
    UnknownTransferEncoding,
    decode_body,
    decoded_size,
    iter_decoded,
    needs_literal8,
    transfer_encoding,
)
from agentpost.model import errors


def _wrapped_b64(data: bytes, width: int = 76, newline: bytes = b"\r\n") -> bytes:
    text = base64.b64encode(data)
    return newline.join(text[i:i + width] for i in range(0, len(text), width))


def _in_pieces(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


# --------------------------------------------------------------------------- CTE names


def test_transfer_encoding_names_are_case_insensitive_and_default_to_7bit():
    assert transfer_encoding(None) == "7bit"
    assert transfer_encoding("") == "7bit"
    assert transfer_encoding("  BASE64 ") == "base64"
    assert transfer_encoding("Quoted-Printable (made by Foo)") == "quoted-printable"
    assert transfer_encoding("8Bit;") == "8bit"
    assert transfer_encoding("binary") == "binary"


@pytest.mark.parametrize("cte", ["x-uuencode", "uuencode", "base-64", "base64 gzip",
                                 "x-" + "a" * 10_000])
def test_an_unknown_transfer_encoding_is_refused_for_unknown_cte(cte):
    with pytest.raises(UnknownTransferEncoding) as caught:
        decode_body(b"begin 644 x\n", cte)
    assert isinstance(caught.value, errors.AgentPostError)
    assert caught.value.type == "unknown_transfer_encoding"
    assert not caught.value.temporary
    with pytest.raises(UnknownTransferEncoding):
        decoded_size(b"", cte)
    with pytest.raises(UnknownTransferEncoding):
        iter_decoded([], cte)  # refused before anything is read


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("cte", [None, "7bit", "8bit", "binary"])
def test_identity_encodings_return_the_octets_unchanged(cte):
    body = b"line\r\n\x00\xff=41 QQ==\r\n"
    assert decode_body(body, cte) == body
    assert decoded_size(memoryview(body), cte) == len(body)


# --------------------------------------------------------------------------- base64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 200), st.sampled_from([b"\r\n", b"\n"]),
       st.integers(4, 80))
def test_base64_round_trips_whatever_the_wrapping_and_slicing(data, piece, newline, width):
    encoded = _wrapped_b64(data, width, newline) + newline
    assert decode_body(encoded, "base64") == data
    assert decoded_size(encoded, "base64") == len(data)
    assert b"".join(iter_decoded(_in_pieces(encoded, piece), "base64")) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500), st.integers(1, 50))
def test_base64_from_the_stdlib_email_encoder_round_trips(data, piece):
    encoded = binascii.b2a_base64(data)  # what email.encoders uses, one line
    assert b"".join(iter_decoded(_in_pieces(encoded, piece), "base64")) == data


def test_base64_tolerates_whitespace_and_a_missing_final_padding():
    assert decode_body(b" SGVs\tbG8s\r\n IHdv cmxk\r\n", "base64") == b"Hello, world"
    assert decode_body(b"SGk", "base64") == b"Hi"
    assert decode_body(b"SGk=", "base64") == b"Hi"
    assert decode_body(b"SGk=\r\n\r\n", "base64") == b"Hi"
    assert decode_body(b"QQ", "base64") == b"A"
    assert decode_body(b"QQ=", "base64") == b"A"
    assert decode_body(b"", "base64") == b""
    assert decode_body(b"\r\n  \r\n", "base64") == b""
    # Padding split across slices.
    assert b"".join(iter_decoded([b"Q", b"Q=", b"", b"=\r\n"], "base64")) == b"A"


@pytest.mark.parametrize("garbage", [
    b"SGVsbG8*\r\n",          # outside the alphabet
    b"SGVs\x00bG8=",          # NUL
    b"SGVsbG8=\r\nSGVsbG8=",  # data after padding
    b"QQ==QUFB",
    b"Q",                      # a lone sextet cannot make an octet
    b"QUFBQ",
    b"QQ===",                 # over-padded
    b"=",
    b"QUFB====",
    "SGVsbG8\u00e9".encode(),  # 8-bit octets
])
def test_base64_garbage_is_refused_rather_than_guessed(garbage):
    with pytest.raises(InvalidTransferEncoding) as caught:
        decode_body(garbage, "base64")
    assert caught.value.type == "invalid_transfer_encoding"
    with pytest.raises(InvalidTransferEncoding):
        decoded_size(garbage, "base64")


# --------------------------------------------------------------------------- quoted-printable


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.booleans(), st.integers(1, 300))
def test_quoted_printable_round_trips_the_stdlib_encoders(data, quotetabs, piece):
    # The stdlib encoders write a CRLF in the data as a plain line break (b"\n\r\n" is
    # encoded as b"\n\n"): they cannot round-trip it, whatever decodes their output.
    while b"\r\n" in data:
        data = data.replace(b"\r\n", b"\n")
    for encoded in (quopri.encodestring(data, quotetabs=quotetabs),
                    binascii.b2a_qp(data, quotetabs=quotetabs)):
        assert decode_body(encoded, "quoted-printable") == data
        assert decoded_size(encoded, "quoted-printable") == len(data)
        assert b"".join(iter_decoded(_in_pieces(encoded, piece), "quoted-printable")) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_quoted_printable_text_with_crlf_round_trips(text):
    data = text.replace("\r", "").replace("\n", "\r\n").encode("utf-8")
    encoded = quopri.encodestring(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert decode_body(encoded, "quoted-printable") == data


def test_quoted_printable_soft_breaks_escapes_and_transport_padding():
    body = b"caf=C3=A9 au lait=\r\n, s'il vous pla=c3=aet   \r\nnext\t \r\nlast  "
    assert decode_body(body, "quoted-printable") == \
        "café au lait, s'il vous plaît\r\nnext\r\nlast".encode()
    assert decode_body(b"soft =  \r\nbreak", "quoted-printable") == b"soft break"
    assert decode_body(b"lf only=\nline \n", "quoted-printable") == b"lf onlyline\n"


def test_quoted_printable_keeps_invalid_escapes_as_they_are():
    assert decode_body(b"a=ZZb = c=4", "quoted-printable") == b"a=ZZb = c=4"


def test_quoted_printable_escapes_split_across_slices_decode_once():
    body = b"x" * 70_000 + b"=C3=A9" + b"y" * 70_000  # one line, longer than a piece
    for piece in (1, 2, 3, 65_536, 70_001, 70_002, 70_004):
        got = b"".join(iter_decoded(_in_pieces(body, piece), "quoted-printable"))
        assert got == b"x" * 70_000 + "é".encode() + b"y" * 70_000, piece


def test_quoted_printable_padding_split_from_its_line_break_is_still_dropped():
    body = b"a" * 70_000 + b"   " + b"\r\nz"
    got = b"".join(iter_decoded([body[:70_002], body[70_002:]], "quoted-printable"))
    assert got == b"a" * 70_000 + b"\r\nz"


# --------------------------------------------------------------------------- scale


def test_a_50_mb_base64_part_decodes_in_bounded_memory():
    payload = bytes(range(256)) * (50 * 1024 * 1024 // 256)
    encoded = _wrapped_b64(payload)
    tracemalloc.start()
    try:
        size = decoded_size(encoded, "base64")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == len(payload)
    assert peak < 16 * 1024 * 1024  # a few 1 MiB slices, never the 50 MB
    assert decode_body(encoded, "base64") == payload


def test_hostile_quoted_printable_shapes_decode():
    """Shapes that make naive decoders rescan (the work itself is in C; the bench,
    not this test, measures speed)."""
    for body in (b" " * (8 * 1024 * 1024),                 # blanks, no line break
                 b"=" * (8 * 1024 * 1024),                 # escapes that never complete
                 b"a \n" * (3 * 1024 * 1024),              # many padded lines
                 b"x" * (8 * 1024 * 1024)):                # one endless line
        assert decoded_size(body, "quoted-printable") <= len(body)


def test_pieces_are_bounded_by_the_slice_size():
    encoded = _wrapped_b64(b"\x01" * (3 * 1024 * 1024))
    pieces = list(iter_decoded(binary._slices(encoded), "base64"))
    assert len(pieces) > 2
    assert max(len(p) for p in pieces) <= binary._CHUNK


# --------------------------------------------------------------------------- literal8


def test_only_data_with_nul_needs_a_literal8():
    assert needs_literal8(b"a\x00b")
    assert not needs_literal8("8-bit é but no NUL".encode())
