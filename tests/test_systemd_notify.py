"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's."""

import os
import socket
import time
import uuid

import pytest

from agentpost import systemd


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A datagram socket playing the service manager; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock):
    return sock.recv(4096).decode("utf-8").split("\n")


def nothing_waiting(sock):
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


def test_ready(manager):
    assert systemd.ready() is True
    assert received(manager) == ["READY=1"]


def test_ready_with_status(manager):
    assert systemd.ready("listening on 25 and 8080")
    assert received(manager) == ["READY=1", "STATUS=listening on 25 and 8080"]


def test_reloading_carries_monotonic_usec(manager):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading("reloading TLS certificates")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(manager)
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2] == "STATUS=reloading TLS certificates"


def test_stopping(manager):
    assert systemd.stopping()
    assert received(manager) == ["STOPPING=1"]


def test_status_is_folded_to_one_line(manager):
    assert systemd.status("TLS reload failed:\n  key does not match\tcertificate")
    assert received(manager) == ["STATUS=TLS reload failed: key does not match certificate"]


def test_several_assignments_go_in_one_datagram(manager):
    assert systemd.notify("READY=1", "STATUS=up")
    assert received(manager) == ["READY=1", "STATUS=up"]
    assert nothing_waiting(manager)


def test_malformed_assignment_is_refused(manager):
    with pytest.raises(ValueError):
        systemd.notify("READY")
    with pytest.raises(ValueError):
        systemd.notify("STATUS=a\nREADY=1")
    assert nothing_waiting(manager)


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.stopping() is False
    assert systemd.notify("READY=1", environ={}) is False


def test_explicit_environ_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "other"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert systemd.ready(environ={"NOTIFY_SOCKET": str(path)})
        assert received(sock) == ["READY=1"]


def test_abstract_namespace_socket(monkeypatch):
    name = f"agentpost-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert received(sock) == ["READY=1"]


def test_unusable_socket_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens-here"))
    assert systemd.ready() is False
    assert "could not notify" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False
