"""The playground's generator: one process per playground model, loaded once, streaming tokens.

    python -m jupyter_llm.train.serve RUN_DIR --checkpoint final --socket PATH --parent PID:CTIME

It listens on a Unix socket (in a private folder the caller made) and speaks JSON lines:
`{"op": "generate", "prompt" | "messages", "max_new_tokens", "temperature", "top_k", "top_p",
"seed"}` answers with `{"text": piece}` lines as tokens are decoded and a last `{"done": true,
"tokens", "seconds", "first_token_s", "stopped"}`; `{"op": "stop"}` ends the generation under
way; `{"op": "close"}` ends the process. It exits by itself when its parent (the kernel or the
server) is gone or after `--idle-timeout` seconds without a request. Never imported by the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .faults import fault

READY = {"ready": True}


class Generator:
    def __init__(self, run_dir: Path, checkpoint: int | str):
        import torch
        import transformers as tf

        from ..spec import Spec
        from .evaluate import load_model

        spec = Spec.from_yaml((run_dir / "spec.yaml").read_text(encoding="utf-8"), check_files=False)
        if spec.model.task != "causal-lm":
            raise ValueError(f"the playground generates text; run {run_dir.name} is a {spec.model.task}")
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        self.torch, self.tf = torch, tf
        tok_dir = run_dir / "final" if checkpoint == "final" else run_dir / "tokenizer"
        self.tok = tf.AutoTokenizer.from_pretrained(tok_dir)
        if self.tok.chat_template is None and spec.tokenizer.chat_template:
            self.tok.chat_template = spec.tokenizer.chat_template
        self.chat = spec.data.format == "chat"
        self.model, self.label, self.step = load_model(run_dir, spec, self.tok, checkpoint)
        self.model.eval()
        cfg = self.model.config
        self.max_positions = int(
            getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 0) or 0
        )
        self.active: set[threading.Event] = set()  # the stop flags of the generations asked for
        self.lock = threading.Lock()
        with torch.no_grad():  # one tiny forward pass now, so the first request is warm
            self.model(input_ids=torch.tensor([[self.tok.eos_token_id or 0]]))

    def prompt_ids(self, req: dict[str, Any]) -> list[int]:
        if req.get("messages") is not None:
            if self.tok.chat_template is None:
                raise ValueError("this run's tokenizer has no chat template: send a prompt, not messages")
            text = self.tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
        else:
            text = str(req.get("prompt") or "")
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"]) or [self.tok.eos_token_id or 0]
        if self.max_positions:  # the newest tokens that leave room for one new one at least
            ids = ids[-(self.max_positions - 1) :]
        return ids

    def generate(self, req: dict[str, Any], send: Any, stop: threading.Event) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch = self.torch
        max_new = max(1, min(int(req.get("max_new_tokens", 64)), 4096))
        temperature = float(req.get("temperature", 0.8))
        ids = self.prompt_ids(req)
        limit = self.max_positions - len(ids) if self.max_positions else max_new
        capped = max_new > limit  # the model has no position beyond max_positions
        max_new = min(max_new, limit)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)

        delay_s = (fault("token_delay_ms") or 0) / 1000  # tests: a generation long enough to stop

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                time.sleep(delay_s)
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "streamer": streamer, "do_sample": temperature > 0,
                                  "stopping_criteria": StoppingCriteriaList([Stop()]),
                                  "pad_token_id": self.tok.pad_token_id if self.tok.pad_token_id is not None
                                  else self.tok.eos_token_id}  # fmt: skip
        if temperature > 0:
            kwargs["temperature"] = temperature
            kwargs["top_k"] = int(req["top_k"]) if req.get("top_k") else 0
            if req.get("top_p"):
                kwargs["top_p"] = float(req["top_p"])
        torch.manual_seed(int(req.get("seed", 0)))
        t0 = time.perf_counter()
        error: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                        dtype=torch.long), **kwargs)  # fmt: skip
            except BaseException as e:  # sent to the client, then the streamer ends
                error.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        first = None
        pieces = 0
        for piece in streamer:
            if piece:
                first = first if first is not None else time.perf_counter() - t0
                pieces += 1
                send({"text": piece})
        worker.join()
        if error:
            raise error[0]
        send({"done": True, "pieces": pieces, "seconds": round(time.perf_counter() - t0, 4),
              "first_token_s": None if first is None else round(first, 4), "stopped": stop.is_set(),
              "prompt_tokens": len(ids), "capped_at": max_new if capped else None})  # fmt: skip


def _parent_alive(parent: str | None) -> bool:
    if not parent:
        return True
    import psutil

    pid, _, ctime = parent.partition(":")
    try:
        p = psutil.Process(int(pid))
        return not ctime or abs(p.create_time() - float(ctime)) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def serve(gen: Generator, sock_path: str, parent: str | None, idle_timeout: float) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    os.chmod(sock_path, 0o600)
    srv.listen(8)
    srv.settimeout(1.0)
    last = [time.monotonic()]
    closing = threading.Event()

    def handle(conn: socket.socket) -> None:
        f = conn.makefile("rwb", buffering=0)
        send_lock = threading.Lock()
        mine: list[threading.Event] = []

        def send(msg: dict[str, Any]) -> None:
            with send_lock:
                f.write((json.dumps(msg) + "\n").encode())

        try:
            send({**READY, "label": gen.label, "step": gen.step, "chat": gen.chat, "pid": os.getpid()})
            for raw in f:
                last[0] = time.monotonic()
                req = json.loads(raw)
                op = req.get("op")
                if op in ("stop", "close"):  # every generation asked for, by any client
                    for ev in list(gen.active):
                        ev.set()
                    if op == "close":
                        closing.set()
                        return
                elif op == "generate":
                    ev = threading.Event()
                    mine.append(ev)
                    gen.active.add(ev)
                    threading.Thread(target=_generate, args=(req, send, ev), daemon=True).start()
        except (OSError, ValueError):
            pass
        finally:
            for ev in mine:  # a client that left stops what it asked for
                ev.set()
            conn.close()

    def _generate(req: dict[str, Any], send: Any, stop: threading.Event) -> None:
        with gen.lock:
            try:
                if not stop.is_set():
                    gen.generate(req, send, stop)
            except OSError:
                pass
            except Exception as e:
                try:
                    send({"done": True, "error": f"{type(e).__name__}: {e}"})
                except OSError:
                    pass
            finally:
                gen.active.discard(stop)
                last[0] = time.monotonic()

    while not closing.is_set():
        try:
            conn, _ = srv.accept()
            last[0] = time.monotonic()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
        except TimeoutError:
            pass
        if not _parent_alive(parent):
            print("parent gone: exiting", flush=True)
            break
        if idle_timeout and time.monotonic() - last[0] > idle_timeout and not gen.lock.locked():
            print(f"idle for {idle_timeout:g} s: exiting", flush=True)
            break
    srv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jupyter_llm.train.serve")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--checkpoint", default="final")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent", default=None, help="PID:CREATE_TIME of the process this one serves")
    ap.add_argument("--idle-timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    ckpt: int | str = int(a.checkpoint) if str(a.checkpoint).isdigit() else a.checkpoint
    status = Path(a.socket).with_suffix(".json")
    try:
        gen = Generator(a.run_dir, ckpt)
    except Exception as e:
        status.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    status.write_text(json.dumps({"pid": os.getpid(), "label": gen.label, "step": gen.step}))
    try:
        serve(gen, a.socket, a.parent, a.idle_timeout)
    finally:
        for p in (a.socket, str(status)):
            if os.path.exists(p):
                os.unlink(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
