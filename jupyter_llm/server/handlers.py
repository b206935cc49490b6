"""REST handlers: thin shells over RunStore / Run / launch / evaluate."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from pydantic import BaseModel
from tornado import web
from tornado.iostream import StreamClosedError

from ..errors import RunNotFound, RunStateError, SpecError, UserError
from ..files import read_json
from ..folder import METRICS_FILE
from ..inputs import InputError, decode
from ..runs import Run, RunStore
from . import models

PREFIX = "jupyter-llm/api"
RESOURCE = "jupyter_llm"


class _Base(APIHandler):
    auth_resource = RESOURCE

    @property
    def store(self) -> RunStore:
        return RunStore(self.settings["jupyter_llm_root"])

    def run_or_404(self, run_id: str) -> Run:
        try:
            return self.store.get(run_id)
        except RunNotFound as e:
            raise _Reply(404, str(e)) from None

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(decode(self.request.body or b"{}", "the body"))
        except InputError as e:
            raise _Reply(413 if e.too_large else 400, str(e)) from None
        except json.JSONDecodeError as e:
            raise _Reply(400, f"the body is not JSON: {e.msg}") from None
        except RecursionError:
            raise _Reply(400, "the body is nested too deeply") from None
        if not isinstance(data, dict):
            raise _Reply(400, "the body must be a JSON object")
        return data

    def int_arg(self, name: str, default: int | None, lo: int = 0, hi: int = 2**62) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _Reply(400, f"{name} must be an integer, not {raw!r}") from None
        if value < lo:
            raise _Reply(400, f"{name} must be >= {lo}")
        if value > hi:
            raise _Reply(400, f"{name} must be <= {hi}")
        return value

    def reply(self, data: BaseModel | dict[str, Any], status: int = 200) -> None:
        """Answer with a model of the API (`models`: what the OpenAPI file and the sidebar's
        types are generated from)."""
        body = data.model_dump(mode="json", by_alias=True) if isinstance(data, BaseModel) else data
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str))


class _Reply(Exception):
    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra or {}


def _handled(method: Any) -> Any:
    """User errors become 4xx replies with a message; nothing the user sends gives a 500."""

    async def wrapper(self: _Base, *args: Any, **kwargs: Any) -> None:
        try:
            await method(self, *args, **kwargs)
        except _Reply as r:
            self.reply({"message": r.message, **r.extra}, r.status)
        except SpecError as e:
            problems = [models.Problem(field=f, given=g, message=m) for f, g, m in e.table()]
            self.reply(models.ErrorReply(message=str(e), problems=problems), 400)
        except RunNotFound as e:
            self.reply(models.ErrorReply(message=str(e)), 404)
        except RunStateError as e:
            self.reply(models.ErrorReply(message=str(e)), 409)
        except UserError as e:
            self.reply(models.ErrorReply(message=str(e)), 400)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


def _row(run: Run) -> dict[str, Any]:
    from ..summary import progress, startup

    p, st = progress(run), run.status()
    return {"run_id": run.id, "name": st.get("name"), "job": st.get("job", "train"), "state": p["state"],
            "step": p["step"], "total": p["total"], "loss": p["last"].get("loss"),
            "val_loss": p["last_val"].get("val_loss"), "eta_s": p["eta_s"], "created_at": st.get("created_at"),
            "started_at": st.get("started_at"), "ended_at": st.get("ended_at"), "error": st.get("error"),
            "restarts": st.get("restarts") or 0, "last_restart": st.get("last_restart"), "startup": startup(run),
            "sweep": read_json(run.path / "sweep.json"), "pipeline": read_json(run.path / "pipeline.json")}  # fmt: skip


class RunsHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self) -> None:
        """Every run, oldest first."""
        rows = [
            models.RunRow.model_validate(_row(run)) for run in self.store.list()
        ]  # damaged reads `damaged`
        self.reply(models.RunList(runs=rows, root=str(self.store.root)))

    @web.authenticated
    @authorized
    @_handled
    async def post(self) -> None:
        """Launch a spec: {"spec": {...}, "overrides": ["optim.lr=3e-4", ...]}."""
        from ..runs import launch
        from ..spec import Spec

        body = self.body()
        if not isinstance(body.get("spec"), dict):
            raise _Reply(400, 'give {"spec": {...}} (a spec mapping; see the Spec reference)')
        overrides = body.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise _Reply(400, "overrides must be a list of key=value strings")
        run = launch(Spec.from_dict(body["spec"], overrides), root=self.store.root)
        self.reply(models.RunRow.model_validate(_row(run)), 201)


class CompareHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self) -> None:
        """Runs side by side (?runs=A,B,...): what %llm_compare shows, as data."""
        from ..evaluation import Comparison

        ids = [i for i in (self.get_query_argument("runs", "") or "").split(",") if i]
        if not 2 <= len(ids) <= 16:
            raise _Reply(400, "give ?runs=A,B (2 to 16 run ids, names or prefixes)")
        c = Comparison([self.run_or_404(i) for i in ids])
        self.reply(models.Comparison(rows=c.rows, labels=c.labels(), metrics=c.metrics, train_metrics=c.train_metrics,
                                     unevaluated=c.unevaluated, spec_diff=c.spec_diff))  # fmt: skip


class RunHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self, run_id: str) -> None:
        """One run: its row, status, spec, manifest, overview and the newest training samples."""
        from ..summary import overview

        run = self.run_or_404(run_id)
        self.reply(models.RunDetail.model_validate({
            **_row(run), "status": run.status(), "spec": run.spec.to_dict(), "manifest": run.manifest(),
            "overview": overview(run), "samples": run.samples()[-100:]}))  # fmt: skip


class MetricsHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self, run_id: str) -> None:
        """metrics.jsonl lines from byte `offset` on, and the offset to ask from next time."""
        from ..files import read_jsonl

        run = self.run_or_404(run_id)
        offset = self.int_arg("offset", 0)
        lines, end = read_jsonl(run.path / METRICS_FILE, offset or 0)
        self.reply(models.Metrics(metrics=lines, offset=end))


class LogsHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self, run_id: str) -> None:
        """The last `n` lines of the launcher's log, or of a rank's."""
        run = self.run_or_404(run_id)
        n = self.int_arg("n", 100, lo=1)
        rank = self.int_arg("rank", None)
        self.reply(models.Logs(lines=run.log_tail(min(n or 100, 10_000), rank), rank=rank))


class ActionHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def post(self, run_id: str, action: str) -> None:
        """stop | resume | evaluate (body: the evaluation's parameters)."""
        run = self.run_or_404(run_id)
        if action == "stop":
            self.reply(models.ActionDone(run_id=run.id, state=run.stop()))
        elif action == "resume":
            run.resume()
            self.reply(models.ActionDone(run_id=run.id, state=run.state))
        else:
            from ..evaluation import evaluate

            ev = evaluate(run, self.body())
            self.reply(models.ActionDone(run_id=run.id, eval_id=ev.id, state=ev.state), 202)


_GENERATORS: dict[tuple[str, str], Any] = {}  # (run folder, checkpoint) -> this server's Generator
_GENERATORS_LOCK = threading.Lock()


def _generator(run: Run, checkpoint: Any) -> Any:
    from ..playground import Generator, check_checkpoint

    ckpt = check_checkpoint(run, checkpoint if isinstance(checkpoint, int | str) else str(checkpoint))
    with _GENERATORS_LOCK:
        key = (str(run.path), str(ckpt))
        if key not in _GENERATORS:
            _GENERATORS[key] = Generator(run, ckpt)
        return _GENERATORS[key]


class GenerateHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def post(self, run_id: str) -> None:
        """Generate from a run's model, streamed as JSON lines ({"text"} pieces, then {"done"});
        body: {prompt | messages, checkpoint, max_new_tokens, temperature, top_k, top_p, seed},
        or {"stop": true, checkpoint} to end the generation under way."""
        from ..playground import SETTINGS

        run = self.run_or_404(run_id)
        body = self.body()
        gen = _generator(run, body.pop("checkpoint", "final"))
        if body.pop("stop", False):
            gen.stop()
            self.reply({"stopped": True})
            return
        prompt, messages = body.pop("prompt", None), body.pop("messages", None)
        if (prompt is None) == (messages is None):
            raise _Reply(400, 'give "prompt" (text) or "messages" (a chat: [{role, content}, ...])')
        if prompt is not None and not isinstance(prompt, str):
            raise _Reply(400, "prompt must be a string")
        if messages is not None and not (isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):  # fmt: skip
            raise _Reply(400, "messages must be a list of {role, content} strings")
        if bad := sorted(set(body) - set(SETTINGS)):
            raise _Reply(400, f"unknown field(s) {bad}; the settings are {', '.join(SETTINGS)}")
        for k, v in body.items():
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise _Reply(400, f"{k} must be a number")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def work() -> None:
            try:
                for msg in gen.events(prompt, messages, **body):
                    loop.call_soon_threadsafe(queue.put_nowait, msg)
            except Exception as e:  # after the first line the status is sent: the error is a line
                loop.call_soon_threadsafe(queue.put_nowait, {"done": True, "error": str(e)})
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        threading.Thread(target=work, daemon=True).start()
        while (msg := await queue.get()) is not None:
            try:
                self.write(json.dumps(msg) + "\n")
                await self.flush()
            except StreamClosedError:  # the client left: its generation ends
                gen.stop()
        self.finish()


ID = r"(?P<run_id>[^/]+)"
ROUTES: list[tuple[str, type[_Base]]] = [
    ("runs", RunsHandler),
    ("compare", CompareHandler),
    (f"runs/{ID}", RunHandler),
    (f"runs/{ID}/metrics", MetricsHandler),
    (f"runs/{ID}/logs", LogsHandler),
    (f"runs/{ID}/(?P<action>stop|resume|evaluate)", ActionHandler),
    (f"runs/{ID}/generate", GenerateHandler),
]


def routes(base_url: str) -> list[tuple[str, type[_Base]]]:
    return [(url_path_join(base_url, PREFIX, pattern), handler) for pattern, handler in ROUTES]
