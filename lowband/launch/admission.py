"""Letting `lowband join` add workers to a running elastic job (lowband.fault.admission).

1. Write a fresh secret to RUN/secret. os.open creates it with mode 0600, so there is no moment
   when another user could read it.
2. Serve admission on every interface. An admitted joiner gets the next worker index (cfg.workers,
   cfg.workers + 1, ...) with the lighthouse, the store, the config and the run folder.
3. Write RUN/elastic.json (the admission HOST:PORT), where `lowband join RUN` looks on this host.
4. Print how to add a worker, from this host or from another.
Admissions and refusals go to the event log.

`lowband join` reads RUN/elastic.json with `admission_address` and the server's answer with
`parse_admission`: a corrupt or mistyped one is one line naming it (RunFileError).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from lowband.config import TrainConfig
from lowband.errors import ConfigError, RunFileError
from lowband.fault.admission import AdmissionServer, generate_secret
from lowband.launch.events import EventLog
from lowband.train.rundir import RunDir, check_fields, read_json, write_json_atomic

ELASTIC_INFO = {"admission": str, "workers": int}
"""The shape of RUN/elastic.json (step 3)."""
PAYLOAD = {"lighthouse": str, "store": str, "config": dict, "run": str, "index": int}
"""The shape of the admission server's answer to an admitted joiner (step 2)."""


def admission_address(run: str | Path) -> str:
    """The admission HOST:PORT of the elastic job running in `run` (its elastic.json)."""
    info = Path(run) / "elastic.json"
    if not info.exists():
        raise ConfigError(f"{run} is not a running elastic job (no elastic.json)")
    addr = read_json(info, ELASTIC_INFO)["admission"]
    host, sep, port = addr.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise RunFileError(f"{info} is corrupt: 'admission' should be HOST:PORT, found {addr!r}")
    return addr


def parse_admission(answer: bytes) -> dict[str, Any]:
    """The admission server's answer (step 2) as a checked dict."""
    where = "the admission server's answer"
    try:
        payload = json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{where} is corrupt: not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise RunFileError(f"{where} is corrupt: it should be a JSON object")
    check_fields(where, payload, PAYLOAD, {})
    return payload


def open_admission(
    cfg: TrainConfig, run: RunDir, lighthouse: str, store: str, events: EventLog
) -> AdmissionServer:
    """Steps 1-4; the server returned is already serving: close() it when the job ends."""
    secret = generate_secret()  # 1.
    secret_path = run.path / "secret"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")

    next_index = cfg.workers  # 2.

    def payload(joiner: str) -> bytes:
        nonlocal next_index
        index, next_index = next_index, next_index + 1
        events.write("admitted", joiner=joiner, index=index)
        return json.dumps(
            {
                "lighthouse": lighthouse,
                "store": store,
                "config": cfg.to_dict(),
                "run": str(run.path),
                "index": index,
            }
        ).encode()

    def on_event(e: dict) -> None:
        if not e.get("accepted"):
            events.write("admission_refused", **{k: v for k, v in e.items() if k != "event"})

    admission = AdmissionServer(
        secret, host="0.0.0.0", run_id=run.path.name, payload=payload, on_event=on_event
    ).start()
    host = socket.gethostname()  # 3.
    port = admission.address[1]
    write_json_atomic(
        run.path / "elastic.json", {"admission": f"{host}:{port}", "workers": cfg.workers}
    )
    print(  # 4.
        f"elastic job: {cfg.workers} workers, lighthouse {lighthouse}; add a worker with\n"
        f"  lowband join {run.path}            (same host)\n"
        f"  lowband join --admission {host}:{port} --token-file SECRET_FILE"
        f"   (another host; SECRET_FILE holds {secret_path}'s line)",
        file=sys.stderr,
    )
    return admission
