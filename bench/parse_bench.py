"""CPU per message of the MX's analysis (parse, IMAP renderings, search keys), in-process.

Why: the server-level bench (smtp_bench.py) sees the analysis as a few percent of a noisy
whole; this one times just it, on the bench's own messages and on a corpus shaped like
everyday mail (issue 12). Process CPU time, the best of ``--rounds`` passes over each
corpus, so other load on the machine inflates the figures less than wall time would.

    .venv/bin/python bench/parse_bench.py
    PYTHONPATH=/tmp/X/old .venv/bin/python bench/parse_bench.py   # an older tree, A/B

Also times the shapes aimed at the inline gate (core.parse_dispatch): the worst message
the gate lets the reactor parse inline, which must stay well under a millisecond.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smtp_bench

from agentpost.core import ingest, parse_dispatch
from agentpost.mail import parse

_WORDS = ("meeting report update invoice agent task status the a of to and in for with "
          "on is at by this that please thanks regards tomorrow today review").split()


def bench_messages(n: int, size: int, kind: str) -> list[bytes]:
    factory = smtp_bench.MessageFactory(size, kind)
    return [factory.head(i % 20, i, f"inbox{i % 20:02d}@bench.example") + factory.body
            for i in range(n)]


def _text(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(_WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def everyday(n: int, seed: int = 7) -> list[bytes]:
    """Mail shaped like an agent's inbox: 60 senders, unique Date/Message-ID/Subject,
    plain text, text+HTML alternatives (some quoted-printable UTF-8), replies with
    References, one in eight with a small attachment, one in six with an encoded-word
    Subject."""
    rng = random.Random(seed)
    start = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        msg = EmailMessage()
        sender = rng.randrange(60)
        msg["From"] = f"Sender {sender} <sender{sender}@example{sender % 7}.com>"
        msg["To"] = "agent@agents.test" if i % 3 else "Agent <agent@agents.test>, ops@corp.example"
        if i % 5 == 0:
            msg["Cc"] = "team@corp.example"
        subject = f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} #{i}"
        msg["Subject"] = ("Caf\u00e9 " + subject) if i % 6 == 0 else subject
        when = start + timedelta(seconds=37 * i)
        zone = timezone(timedelta(hours=rng.choice([-5, 0, 1, 9])))
        msg["Date"] = format_datetime(when.astimezone(zone))
        msg["Message-ID"] = f"<{i}.{rng.getrandbits(40):x}@example{sender % 7}.com>"
        if i % 4 == 1:
            msg["In-Reply-To"] = f"<{i - 1}.parent@agents.test>"
            msg["References"] = f"<root.{i // 10}@agents.test> <{i - 1}.parent@agents.test>"
        body = _text(rng, rng.randrange(40, 400))
        if i % 7 == 0:
            body = body.replace("the", "th\u00e9")  # UTF-8: quoted-printable or base64
        msg.set_content(body)
        if i % 2:
            msg.add_alternative("<html><body><p>" + body.replace("\n", "<br>\n")
                                + "</p></body></html>\n", subtype="html")
        if i % 8 == 3:
            msg.add_attachment(rng.randbytes(rng.randrange(200, 3000)), maintype="application",
                               subtype="pdf", filename=f"report-{i}.pdf")
        out.append(msg.as_bytes(policy=SMTP))
    return out


def gate_shapes() -> dict[str, bytes]:
    """Messages aimed at the cheapest-looking checks: each is timed only if the inline
    gate lets it through (the others go to the thread pool)."""
    head = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
    return {
        "stray delimiters in lines": head + b'Content-Type: multipart/mixed; boundary="b"\r\n'
        b"\r\n--b\r\n\r\n" + b"x--b" * 3500 + b"\r\n--b--\r\n",
        "a 12 KiB header line with no colon": head + b"a" * 12000 + b"\r\n\r\nx",
        "140 fields": head + b"".join(b"X-%d: v\r\n" % i for i in range(140)) + b"\r\nx",
        "a field folded 140 times": head + b"X-F: x" + b"\r\n y" * 140 + b"\r\n\r\nx",
        "16 KiB of base64": head + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b"QUJD" * 4000,
        "16 KiB of quoted-printable": head + b"Content-Transfer-Encoding: quoted-printable"
        b"\r\n\r\n" + b"=C3=A9" * 2700,
        "16 KiB of HTML": head + b"Content-Type: text/html\r\n\r\n" + b"<b>" * 5400,
        "8 parts": head + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n" + b"y" * 1500 + b"\r\n"
                   for _ in range(7)) + b"--b--\r\n",
    }


def best(fn: Callable[[bytes], object], corpus: list[bytes], rounds: int) -> float:
    """Microseconds of process CPU per message, the best of ``rounds`` passes."""
    for raw in corpus[: max(1, len(corpus) // 10)]:
        fn(raw)
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for raw in corpus:
            fn(raw)
        times.append(time.process_time() - start)
    return min(times) / len(corpus) * 1e6


def _stdlib(raw: bytes) -> object:
    return parse._parse(raw, raw, [], None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        from agentpost.mail import parse_fast
        direct: Callable[[bytes], object] | None = parse_fast.parse_simple
    except ImportError:
        direct = None
    corpora = {
        "bench 4 KiB text": bench_messages(args.messages, 4096, "text"),
        "bench 16 KiB attachment": bench_messages(args.messages, 16384, "attachment"),
        "everyday mail": everyday(args.messages),
    }
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; "
          f"agentpost from {os.path.dirname(os.path.dirname(parse.__file__))}")
    print(f"{'corpus':26s} {'analysis':>9s} {'parse':>8s} {'stdlib':>8s} {'direct':>7s}"
          "   (us per message, process CPU, best of rounds)")
    for name, corpus in corpora.items():
        taken = (sum(direct(raw) is not None for raw in corpus) / len(corpus)
                 if direct else 0.0)
        print(f"{name:26s} {best(ingest._analyse_indexed, corpus, args.rounds):9.1f} "
              f"{best(parse.parse_message, corpus, args.rounds):8.1f} "
              f"{best(_stdlib, corpus, args.rounds):8.1f} {taken:7.0%}")
    print("\ninline gate: shapes it lets through, whole analysis (us, best of rounds)")
    for name, raw in gate_shapes().items():
        if not parse_dispatch.looks_plain(raw):
            print(f"  {name:36s} -> thread pool")
            continue
        print(f"  {name:36s} {best(ingest._analyse_indexed, [raw] * 20, args.rounds):9.1f}")


if __name__ == "__main__":
    main()
