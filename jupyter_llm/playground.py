"""Talk to a trained model without importing torch here: a generator process per model.

    gen = Generator(run, checkpoint="final")        # starts nothing yet
    for piece in gen.stream("ROMEO:", max_new_tokens=64, temperature=0.8, seed=1):
        print(piece, end="")
    gen.stop()                                      # from another thread: ends the generation
    gen.close()                                     # the process is gone

The process (`python -m jupyter_llm.train.serve`) starts on first use, loads the model once,
listens on a Unix socket in a private folder and streams decoded pieces as they come. It exits
when closed, after `idle_timeout` seconds without a request, or when the process that started
it (this kernel, the Jupyter server) is gone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RunStateError, UserError
from .files import read_json
from .folder import CKPT_MARKER, FINAL_DIR, LOGS_DIR, RunFolder

START_TIMEOUT_S = 300.0
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def checkpoint_steps(run: RunFolder) -> list[int]:
    return [int((read_json(p / CKPT_MARKER) or {})["step"]) for p in run.checkpoints()]


def check_checkpoint(run: RunFolder, checkpoint: int | str) -> int | str:
    """`checkpoint` as the generator takes it ("final", "latest" or a step), or a clear error."""
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        checkpoint = int(checkpoint)
    if checkpoint == "final":
        if not (run.path / FINAL_DIR / "config.json").is_file():
            raise RunStateError(f"run {run.id} has no final model ({run.state}); try a checkpoint: "
                                f"latest or a step (saved: {checkpoint_steps(run) or 'none'})")  # fmt: skip
        return checkpoint
    steps = checkpoint_steps(run)
    if checkpoint == "latest":
        if not steps:
            raise RunStateError(f"run {run.id} has no complete checkpoint")
        return checkpoint
    if not isinstance(checkpoint, int) or checkpoint not in steps:
        raise UserError(f"run {run.id} has no complete checkpoint {checkpoint!r}; it has final and {steps}")
    return checkpoint


class Generator:
    """One model of one run in its own process, started on first use."""

    def __init__(self, run: RunFolder, checkpoint: int | str = "final", idle_timeout: float = 900.0):
        spec = run.spec
        if spec.model.task != "causal-lm":
            raise UserError(f"the playground generates text; run {run.id} is a {spec.model.task} model")
        self.run, self.checkpoint = run, check_checkpoint(run, checkpoint)
        self.idle_timeout = idle_timeout
        self.chat = spec.data.format == "chat"
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Generator({self.run.id}, {self.checkpoint}, {'running' if self.alive else 'not started'})"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def label(self) -> str:
        return str(self.info.get("label") or self.checkpoint)

    def start(self) -> Generator:
        """Start the process and wait until the model is loaded (idempotent)."""
        with self._lock:
            if self.alive:
                return self
            import psutil

            self._cleanup()  # an earlier process's folder (it ended when idle, say)
            self.dir = Path(tempfile.mkdtemp(prefix="jllm-gen-"))  # private (0700), short: a socket path
            sock = self.dir / "gen.sock"
            me = psutil.Process()
            log_path = self.run.path / LOGS_DIR / "playground.log"
            log_path.parent.mkdir(exist_ok=True)
            with open(log_path, "ab") as log:
                log.write(f"\n== generator for {self.checkpoint}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "jupyter_llm.train.serve", str(self.run.path), "--checkpoint",
                     str(self.checkpoint), "--socket", str(sock), "--parent", f"{me.pid}:{me.create_time()}",
                     "--idle-timeout", str(self.idle_timeout)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if self.proc.poll() is not None:
                    why = (read_json(sock.with_suffix(".json")) or {}).get(
                        "error"
                    ) or "see logs/playground.log"
                    self._cleanup()
                    raise UserError(f"the generator for run {self.run.id} ({self.checkpoint}) exited: {why}")
                if sock.exists():
                    try:
                        with self._connect() as f:
                            self.info = json.loads(f.readline())
                        return self
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    self.close()
                    raise UserError(f"the generator did not load the model within {START_TIMEOUT_S:g} s")
                time.sleep(0.05)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        assert self.dir is not None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.dir / "gen.sock"))
            with s.makefile("rwb", buffering=0) as f:
                yield f
        finally:
            s.close()

    def events(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
               **settings: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
        """The generation's messages: {"text": piece} as they come, then {"done": True, ...}."""
        bad = sorted(set(settings) - set(SETTINGS))
        if bad:
            raise UserError(f"unknown generation setting(s) {bad}; use {', '.join(SETTINGS)}")
        if (prompt is None) == (messages is None):
            raise UserError("give a prompt or chat messages (one of the two)")
        self.start()
        req = {"op": "generate", "prompt": prompt, "messages": messages, **settings}
        with self._connect() as f:
            f.readline()  # ready
            f.write((json.dumps(req) + "\n").encode())
            for raw in f:
                msg = json.loads(raw)
                yield msg
                if msg.get("done"):
                    if msg.get("error"):
                        raise UserError(f"generation failed: {msg['error']}")
                    return
        raise UserError(
            f"the generator for run {self.run.id} ended during the generation; see logs/playground.log"
        )

    def stream(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
               **settings: Any) -> Iterator[str]:  # fmt: skip
        """The generated text, piece by piece."""
        for msg in self.events(prompt, messages, **settings):
            if "text" in msg:
                yield msg["text"]

    def generate(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                 **settings: Any) -> str:  # fmt: skip
        return "".join(self.stream(prompt, messages, **settings))

    def stop(self) -> None:
        """End the generation under way (it answers done with stopped: true)."""
        if not self.alive:
            return
        with contextlib.suppress(OSError), self._connect() as f:
            f.readline()
            f.write(b'{"op": "stop"}\n')

    def close(self, timeout: float = 10.0) -> None:
        """End the process (and its socket folder)."""
        if self.alive:
            with contextlib.suppress(OSError), self._connect() as f:
                f.readline()
                f.write(b'{"op": "close"}\n')
            assert self.proc is not None
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def generator_pids() -> list[int]:
    """Every playground generator process on this machine (for tests and `ps`-like checks)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "jupyter_llm.train.serve" in cmd:
            out.append(p.pid)
    return out
