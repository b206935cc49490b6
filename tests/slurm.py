"""A real one-machine Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's
packages, every file (config, key, sockets, state, logs) in a temporary folder, listening on
127.0.0.1 only, stopped by the PIDs in their pid files. Clients find it through $SLURM_CONF.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sshd import require


@dataclass
class Slurm:
    dir: Path
    conf: Path

    def stop(self) -> None:
        """Cancel what is still queued or running (a failed test's job would outlive slurmd in
        its slurmstepd), then stop the daemons."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=env, capture_output=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
        for name in ("d.pid", "ctld.pid", "munged.pid"):
            try:
                os.kill(int((self.dir / name).read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_slurm(tmp: Path) -> Slurm:
    require(
        ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel"),
        "Slurm cluster (munge, slurm)",
    )
    tmp.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (tmp / sub).mkdir(exist_ok=True)
    key = tmp / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = tmp / "munge.sock"
    sbin = "/usr/sbin/"
    subprocess.run([sbin + "munged", "-f", f"--socket={sock}", f"--key-file={key}", f"--log-file={tmp / 'munged.log'}",
                    f"--pid-file={tmp / 'munged.pid'}", f"--seed-file={tmp / 'munged.seed'}"], check=True)  # fmt: skip
    host = socket.gethostname().split(".")[0]
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=jllm
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_port()}
SlurmdPort={_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={tmp / "state"}
SlurmdSpoolDir={tmp / "spool"}
SlurmctldPidFile={tmp / "ctld.pid"}
SlurmdPidFile={tmp / "d.pid"}
SlurmctldLogFile={tmp / "ctld.log"}
SlurmdLogFile={tmp / "d.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run([sbin + "slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run([sbin + "slurmd", "-f", str(conf)], check=True, env=env)
    s = Slurm(tmp, conf)
    deadline = time.monotonic() + 30
    while True:  # ready once the node is idle
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
        if out.stdout.strip() == "idle":
            return s
        if time.monotonic() > deadline:
            s.stop()
            raise RuntimeError(
                f"Slurm did not come up: {out.stdout} {out.stderr} {(tmp / 'ctld.log').read_text()[-2000:]}"
            )
        time.sleep(0.3)
