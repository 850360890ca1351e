"""Admission: HMAC challenge/response; wrong, empty, garbage, silent and replayed clients refused."""

import os
import socket
import threading
import time

import pytest

from lowband.errors import ConfigError
from lowband.fault import (
    AdmissionError,
    AdmissionRefused,
    AdmissionServer,
    generate_secret,
    load_secret,
    request_admission,
)
from lowband.fault.admission import MAGIC, NONCE_BYTES, joiner_tag, recv_frame, send_frame

SECRET = "correct horse battery staple"
PAYLOAD = b"rendezvous=10.0.0.7:29500"


@pytest.fixture
def server():
    with AdmissionServer(SECRET, run_id="run-42", payload=PAYLOAD, timeout_s=0.5) as s:
        yield s


def addr(server) -> str:
    host, port = server.address
    return f"{host}:{port}"


def refused_line(server) -> str:
    return f"admission refused by {addr(server)}: wrong or missing run secret"


def test_right_secret_gets_the_payload(server):
    assert request_admission(addr(server), SECRET, "worker-3", timeout=5) == PAYLOAD
    assert server.admitted == {"worker-3"}
    assert server.events[-1] == {
        "event": "admission",
        "accepted": True,
        "joiner": "worker-3",
        "peer": server.events[-1]["peer"],
        "reason": None,
    }


def test_payload_function_sees_the_joiner():
    with AdmissionServer(SECRET, payload=lambda j: f"hello {j}".encode()) as s:
        assert request_admission(s.address, SECRET.encode(), "w9") == b"hello w9"


@pytest.mark.parametrize("secret", ["wrong secret", "", None])
def test_wrong_or_missing_secret_is_refused(server, secret):
    with pytest.raises(AdmissionRefused) as e:
        request_admission(addr(server), secret, "intruder", timeout=5)
    assert str(e.value) == refused_line(server)
    assert server.admitted == set()
    assert server.events[-1]["accepted"] is False
    assert server.events[-1]["joiner"] == "intruder"


def good_client_still_admitted(server) -> None:
    assert request_admission(addr(server), SECRET, "late-good", timeout=5) == PAYLOAD


def test_garbage_bytes_are_refused_and_the_server_goes_on(server):
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(os.urandom(64) + b"\xff\xff\xff\xff" * 8)
        reply = recv_frame(s, time.monotonic() + 5, 1 << 16)  # the hello
        assert reply.startswith(MAGIC)
        reply = recv_frame(s, time.monotonic() + 5, 1 << 16)
    assert reply.startswith(b"R")
    assert server.events[-1]["accepted"] is False
    good_client_still_admitted(server)


def test_silent_client_blocks_the_server_at_most_its_timeout(server):
    silent = socket.create_connection(server.address, timeout=5)
    try:
        time.sleep(0.05)  # the server is now waiting on the silent client
        t0 = time.monotonic()
        good_client_still_admitted(server)
        assert time.monotonic() - t0 < 0.5 + 2.0
    finally:
        silent.close()
    assert server.events[0]["accepted"] is False
    assert "no valid response within 0.5s" in server.events[0]["reason"]
    assert server.admitted == {"late-good"}


def test_replayed_response_to_a_new_nonce_is_refused(server):
    def hello(s):
        h = recv_frame(s, time.monotonic() + 5, 1 << 16)
        return h[len(MAGIC) : len(MAGIC) + NONCE_BYTES], h[len(MAGIC) + NONCE_BYTES :]

    # an eavesdropper records one legitimate exchange...
    with socket.create_connection(server.address, timeout=5) as s:
        nonce, run_id = hello(s)
        assert run_id == b"run-42"
        recorded = joiner_tag(SECRET, nonce, run_id, b"w1") + os.urandom(NONCE_BYTES) + b"w1"
        send_frame(s, recorded)
        assert recv_frame(s, time.monotonic() + 5, 1 << 16).startswith(b"A")
    # ...and replays it on a new connection: a fresh nonce makes it worthless
    with socket.create_connection(server.address, timeout=5) as s:
        nonce2, _ = hello(s)
        assert nonce2 != nonce
        send_frame(s, recorded)
        reply = recv_frame(s, time.monotonic() + 5, 1 << 16)
    assert reply == b"R" + b"wrong or missing run secret"
    assert [e["accepted"] for e in server.events] == [True, False]


def test_spoofed_server_is_not_trusted():
    """A server that does not hold the secret cannot produce the accept proof."""

    def fake_server(listener):
        conn, _ = listener.accept()
        with conn:
            send_frame(conn, MAGIC + os.urandom(NONCE_BYTES) + b"run-42")
            recv_frame(conn, time.monotonic() + 5, 1 << 16)
            send_frame(conn, b"A" + os.urandom(32) + b"rendezvous=evil:1")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        t = threading.Thread(target=fake_server, args=(listener,), daemon=True)
        t.start()
        with pytest.raises(AdmissionError, match="did not prove it holds the run secret"):
            request_admission(listener.getsockname()[:2], SECRET, "w", timeout=5)
        t.join(5)


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AdmissionError, match="cannot reach admission server"):
        request_admission(f"127.0.0.1:{port}", SECRET, "w", timeout=1)


def test_secrets(tmp_path):
    a, b = generate_secret(), generate_secret()
    assert a != b and len(a) >= 43
    f = tmp_path / "secret"
    f.write_text(a + "\n")
    f.chmod(0o600)
    assert load_secret(secret_file=f) == a.encode()
    assert load_secret(secret=a) == a.encode()
    for kwargs in ({}, {"secret": ""}, {"secret": a, "secret_file": f}):
        with pytest.raises(ConfigError):
            load_secret(**kwargs)
    with pytest.raises(ConfigError, match="cannot read --secret-file"):
        load_secret(secret_file=tmp_path / "missing")
    with pytest.raises(ConfigError):
        AdmissionServer("")
