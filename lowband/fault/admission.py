"""Admission: a joining worker proves it holds the run's secret before it learns anything.

A member of the running job serves `AdmissionServer` in a thread; a newcomer calls
`request_admission` first, and only on success gets the payload the server was given (the
rendezvous address: lighthouse, store, whatever the membership layer needs). A wrong or missing
secret is refused with one clear line, and the refused worker never learns where the state is.

Protocol (HMAC-SHA256, stdlib only), over one TCP connection, every message a frame of a 4-byte
big-endian length and a body, each with a hard size cap:

  1. server -> joiner   MAGIC | nonce_s (32 random bytes) | run_id
  2. joiner -> server   tag_j (32) | nonce_j (32 random bytes) | joiner_id (utf-8, <= 256 bytes)
                        tag_j = HMAC(secret, "lowband-admission-v1 joiner" | nonce_s | run_id | joiner_id)
  3. server -> joiner   "A" | tag_s (32) | payload                        (accept)
                        tag_s = HMAC(secret, "lowband-admission-v1 server" | nonce_s | nonce_j
                                            | run_id | joiner_id | payload)
                     or "R" | reason (utf-8)                                (reject)

(run_id, joiner_id and payload enter the MACs length-prefixed, so fields cannot be shifted.) The
server compares tags in constant time (hmac.compare_digest). A fresh nonce per connection makes a
recorded response useless on the next connection (no replay); the distinct labels stop a tag
from being reflected back. tag_s lets the joiner check that the payload came unaltered from a
holder of the secret, so a spoofed server cannot send it to a rendezvous of its own.

The server handles one connection at a time, each under one deadline (`timeout_s`) for the whole
exchange: a silent, slow or garbage-sending client costs it at most that long, then it moves on.
The training loop never waits on it (it runs in its own thread).

What this does not do (docs/fault.md): it is not encryption (the payload and all later traffic
are in the clear), it authenticates nothing after admission, and it cannot help when the secret
leaks or an admitted member is malicious.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowband.errors import ConfigError, LowbandError

log = logging.getLogger("lowband.fault")

MAGIC = b"LBADM1"
NONCE_BYTES = 32
TAG_BYTES = 32
MAX_ID_BYTES = 256
MAX_PAYLOAD_BYTES = 1 << 16
_LABEL_JOINER = b"lowband-admission-v1 joiner\0"
_LABEL_SERVER = b"lowband-admission-v1 server\0"
REFUSED_SECRET = "wrong or missing run secret"


class AdmissionError(LowbandError):
    """Admission could not complete (server unreachable, timed out, or not a lowband server)."""


class AdmissionRefused(AdmissionError):
    """The admission server refused this worker (wrong or missing run secret)."""


# -- secrets ------------------------------------------------------------------------------------
def generate_secret() -> str:
    """A fresh run secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def load_secret(secret: str | None = None, secret_file: str | Path | None = None) -> bytes:
    """The run secret from `--secret VALUE` or `--secret-file PATH` (exactly one).

    Prefer the file: a value on the command line is visible to every user of the host (ps). The
    file's content is stripped of surrounding whitespace; a group- or world-readable file is
    accepted with a warning.
    """
    if (secret is None) == (secret_file is None):
        raise ConfigError(
            "give the run secret either as a value (--token) or as a file (--token-file), not both"
        )
    if secret_file is not None:
        path = Path(secret_file)
        try:
            secret = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"cannot read --secret-file {path}: {e.strerror}") from None
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("secret file %s is readable by other users; chmod 600 it", path)
    if not secret:
        raise ConfigError("the run secret is empty; make one with lowband.fault.generate_secret()")
    return secret.encode()


def _as_key(secret: bytes | str | None) -> bytes:
    if secret is None:
        return b""
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def joiner_tag(secret: bytes | str | None, nonce: bytes, run_id: bytes, joiner_id: bytes) -> bytes:
    """The joiner's response to the server's challenge (message 2)."""
    msg = _LABEL_JOINER + nonce + _lp(run_id) + _lp(joiner_id)
    return hmac.new(_as_key(secret), msg, hashlib.sha256).digest()


def server_tag(
    secret: bytes | str | None,
    nonce_s: bytes,
    nonce_j: bytes,
    run_id: bytes,
    joiner_id: bytes,
    payload: bytes,
) -> bytes:
    """The server's proof that it holds the secret and sent this payload (message 3)."""
    msg = _LABEL_SERVER + nonce_s + nonce_j + _lp(run_id) + _lp(joiner_id) + _lp(payload)
    return hmac.new(_as_key(secret), msg, hashlib.sha256).digest()


# -- framing ------------------------------------------------------------------------------------
class _Malformed(Exception):
    pass


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """One frame, refusing (without reading it) a body longer than `limit`."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4, deadline))
    if n > limit:
        raise _Malformed(f"frame of {n} bytes, over the {limit}-byte limit")
    return _recv_exact(sock, n, deadline)


def _parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"malformed admission address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


# -- server -------------------------------------------------------------------------------------
class AdmissionServer:
    """Serves admission on (host, port) in a daemon thread; see the module docstring.

    `payload` is sent to admitted joiners: bytes, or a function joiner_id -> bytes. Every attempt
    becomes an event {"event": "admission", "accepted", "joiner", "peer", "reason"} in `events`
    and `on_event`; admitted joiner ids collect in `admitted` (for the membership layer to check).
    """

    def __init__(
        self,
        secret: bytes | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        run_id: str = "",
        payload: bytes | Callable[[str], bytes] = b"",
        timeout_s: float = 5.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._secret = _as_key(secret)
        if not self._secret:
            raise ConfigError("the admission server needs a non-empty run secret")
        self.run_id = run_id.encode()
        if len(self.run_id) > MAX_ID_BYTES:
            raise ConfigError(f"run id longer than {MAX_ID_BYTES} bytes")
        self.payload = payload
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.admitted: set[str] = set()
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.2)  # accept() wakes up to notice close()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> AdmissionServer:
        self._thread = threading.Thread(target=self._serve, name="lowband-admission", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sock.close()

    def __enter__(self) -> AdmissionServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._handle(conn, f"{peer[0]}:{peer[1]}")

    def _handle(self, conn: socket.socket, peer: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        joiner: str | None = None
        try:
            send_frame(conn, MAGIC + nonce_s + self.run_id)
            msg = recv_frame(conn, deadline, TAG_BYTES + NONCE_BYTES + MAX_ID_BYTES)
            if len(msg) < TAG_BYTES + NONCE_BYTES:
                raise _Malformed("response too short")
            tag, nonce_j, joiner_b = (
                msg[:TAG_BYTES],
                msg[TAG_BYTES : TAG_BYTES + NONCE_BYTES],
                msg[TAG_BYTES + NONCE_BYTES :],
            )
            try:
                joiner = joiner_b.decode()
            except UnicodeDecodeError:
                raise _Malformed("joiner id is not utf-8") from None
            expected = joiner_tag(self._secret, nonce_s, self.run_id, joiner_b)
            if not hmac.compare_digest(tag, expected):
                self._reject(conn, peer, joiner, REFUSED_SECRET)
                return
            payload = self.payload(joiner) if callable(self.payload) else self.payload
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ValueError(f"admission payload over {MAX_PAYLOAD_BYTES} bytes")
            proof = server_tag(self._secret, nonce_s, nonce_j, self.run_id, joiner_b, payload)
            self.admitted.add(
                joiner
            )  # recorded before the reply, so it is there once the joiner has it
            self._event(True, joiner, peer, None)
            send_frame(conn, b"A" + proof + payload)
        except TimeoutError:
            self._reject(conn, peer, joiner, f"no valid response within {self.timeout_s:g}s")
        except _Malformed as e:
            self._reject(conn, peer, joiner, f"malformed admission request: {e}")
        except OSError as e:  # the client went away
            self._event(False, joiner, peer, f"connection lost: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. the payload function failed: keep serving
            log.exception("admission server: error while handling %s", peer)
            self._reject(conn, peer, joiner, f"server error: {type(e).__name__}")

    def _reject(self, conn: socket.socket, peer: str, joiner: str | None, reason: str) -> None:
        self._event(False, joiner, peer, reason)
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            send_frame(conn, b"R" + reason.encode())

    def _event(self, accepted: bool, joiner: str | None, peer: str, reason: str | None) -> None:
        event = {
            "event": "admission",
            "accepted": accepted,
            "joiner": joiner,
            "peer": peer,
            "reason": reason,
        }
        if accepted:
            log.info("admitted %s from %s", joiner, peer)
        else:
            log.warning("refused admission to %r from %s: %s", joiner, peer, reason)
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)


# -- joiner -------------------------------------------------------------------------------------
def request_admission(
    addr: str | tuple[str, int],
    secret: bytes | str | None,
    joiner_id: str,
    timeout: float = 10.0,
) -> bytes:
    """Prove the run secret to the server at addr ("HOST:PORT"); returns the admission payload.

    Raises AdmissionRefused on a wrong or missing secret, AdmissionError when the server cannot
    be reached, does not answer in `timeout` seconds, or cannot prove it holds the secret itself.
    """
    host, port = _parse_addr(addr)
    where = f"{host}:{port}"
    joiner_b = joiner_id.encode()
    if len(joiner_b) > MAX_ID_BYTES:
        raise ConfigError(f"joiner id longer than {MAX_ID_BYTES} bytes")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise AdmissionError(f"cannot reach admission server {where}: {e}") from None
    with sock:
        try:
            hello = recv_frame(sock, deadline, len(MAGIC) + NONCE_BYTES + MAX_ID_BYTES)
            if not hello.startswith(MAGIC) or len(hello) < len(MAGIC) + NONCE_BYTES:
                raise AdmissionError(f"{where} is not a lowband admission server")
            nonce_s = hello[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
            run_id = hello[len(MAGIC) + NONCE_BYTES :]
            nonce_j = secrets.token_bytes(NONCE_BYTES)
            send_frame(sock, joiner_tag(secret, nonce_s, run_id, joiner_b) + nonce_j + joiner_b)
            reply = recv_frame(sock, deadline, 1 + TAG_BYTES + MAX_PAYLOAD_BYTES)
        except TimeoutError:
            raise AdmissionError(
                f"admission server {where} did not answer in {timeout:g}s"
            ) from None
        except (OSError, _Malformed) as e:
            raise AdmissionError(f"admission with {where} failed: {e}") from None
    kind, body = reply[:1], reply[1:]
    if kind == b"R":
        reason = body.decode(errors="replace")[:200]
        raise AdmissionRefused(f"admission refused by {where}: {reason}")
    if kind != b"A" or len(body) < TAG_BYTES:
        raise AdmissionError(f"admission with {where} failed: unexpected reply")
    proof, payload = body[:TAG_BYTES], body[TAG_BYTES:]
    expected = server_tag(secret, nonce_s, nonce_j, run_id, joiner_b, payload)
    if not hmac.compare_digest(proof, expected):
        raise AdmissionError(
            f"admission server {where} did not prove it holds the run secret; not joining"
        )
    return payload
