"""Starting workers: N local processes, one process per GPU under torchrun, or an elastic job.

The map:
- local.py       `lowband train --workers N`: N processes on 127.0.0.1, Gloo or NCCL (launch_local)
- torchrun.py    this process is one worker of a torchrun job (launch_torchrun, under_torchrun)
- failures.py    a failed worker becomes one WorkerFailed, from the workers' error queue
- elastic.py     `--elastic`: launch_elastic composes the pieces below; join_job for `lowband join`
- lighthouse.py    the torchft Lighthouse: the user's address, or one started in this process
- events.py        the launcher's event log, RUN/metrics/events.jsonl
- admission.py     RUN/secret, the admission server for `lowband join`, RUN/elastic.json
- supervisor.py    spawning, watching and restarting the elastic workers
- worker.py        what runs inside one elastic worker process; quiet_torchft
- summary.py       the workers' RUN/summaries/rank*.json merged into RUN/summary.json
"""

from lowband.launch.elastic import join_job, launch_elastic
from lowband.launch.failures import WorkerFailed
from lowband.launch.local import launch_local, pick_device
from lowband.launch.torchrun import launch_torchrun, under_torchrun
from lowband.launch.worker import quiet_torchft

__all__ = [
    "WorkerFailed",
    "join_job",
    "launch_elastic",
    "launch_local",
    "launch_torchrun",
    "pick_device",
    "quiet_torchft",
    "under_torchrun",
]
