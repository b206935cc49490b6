"""A real OpenSSH server on loopback aliases (127.0.0.2, 127.0.0.3): the test "nodes".

One sshd (root, daemonized, its PidFile in a temporary folder, stopped by that PID) listens
on both addresses at one port; a fresh host key and user key per session; the client side
gets a known_hosts file written from the host's public key, so host keys are checked
strictly. Nothing outside 127.0.0.0/8 is ever addressed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NODES = ("127.0.0.2", "127.0.0.3")


@dataclass
class Sshd:
    dir: Path
    port: int
    identity: Path
    known_hosts: Path
    pid: int

    def cluster(self, workdirs: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        """A cluster of the two loopback nodes, 1 rank each; own work folder per node (they
        are one machine, so separate folders stand in for separate disks)."""
        workdirs = workdirs or [str(self.dir / f"node{i}") for i in range(len(NODES))]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if os.environ.get("TORCH_EXTENSIONS_DIR"):  # the prebuilt DeepSpeed ops (no rebuild)
            env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
        return {
            "hosts": [
                {"host": h, "port": self.port, "slots": 1, "workdir": w}
                for h, w in zip(NODES, workdirs, strict=True)
            ],
            "python": sys.executable,
            "ssh": {"identity": str(self.identity), "known_hosts": str(self.known_hosts)},
            "env": env,
            **extra,
        }

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((NODES[0], 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s2:
                s2.bind((NODES[1], port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both loopback nodes")


def require(tools: tuple[str, ...], what: str) -> None:
    """Skip unless every tool exists and we are root; fail instead where CI sets
    JUPYTER_LLM_REQUIRE_SSHD (there these tests must run)."""
    missing = [t for t in tools if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}"))]
    why = f"{what} missing ({', '.join(missing)}); `make nodes` installs them" if missing else None
    if why is None and os.geteuid() != 0:
        why = f"the test {what} runs as root"
    if why:
        if os.environ.get("JUPYTER_LLM_REQUIRE_SSHD"):
            pytest.fail(why)
        pytest.skip(why)


def start_sshd(tmp: Path) -> Sshd:
    require(("sshd", "ssh", "ssh-keygen", "rsync"), "openssh-server/openssh-client/rsync")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    tmp.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "user_key.pub").read_text())
    port = _free_port()
    config = tmp / "sshd_config"
    config.write_text(
        "\n".join(
            [
                *(f"ListenAddress {h}:{port}" for h in NODES),
                f"HostKey {tmp / 'host_key'}",
                f"PidFile {tmp / 'sshd.pid'}",
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                "StrictModes no",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "LogLevel VERBOSE",
            ]
        )
        + "\n"
    )
    subprocess.run([sshd, "-f", str(config), "-E", str(tmp / "sshd.log")], check=True)
    deadline = time.monotonic() + 10
    while not (tmp / "sshd.pid").is_file() or not (tmp / "sshd.pid").read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start: {(tmp / 'sshd.log').read_text()}")
        time.sleep(0.05)
    pid = int((tmp / "sshd.pid").read_text())
    key = (tmp / "host_key.pub").read_text().split()
    known = tmp / "known_hosts"
    known.write_text(",".join(f"[{h}]:{port}" for h in NODES) + f" {key[0]} {key[1]}\n")
    return Sshd(tmp, port, tmp / "user_key", known, pid)
