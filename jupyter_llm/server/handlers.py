"""REST handlers: thin shells over RunStore / Run / launch / evaluate."""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import RunNotFound, RunStateError, SpecError, UserError
from ..files import read_json
from ..folder import METRICS_FILE
from ..inputs import InputError, decode
from ..runs import Run, RunStore

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

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))


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
            self.reply({"message": str(e), "problems": [{"field": f, "given": g, "message": m}
                                                         for f, g, m in e.table()]}, 400)  # fmt: skip
        except RunNotFound as e:
            self.reply({"message": str(e)}, 404)
        except RunStateError as e:
            self.reply({"message": str(e)}, 409)
        except UserError as e:
            self.reply({"message": str(e)}, 400)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


def _row(run: Run) -> dict[str, Any]:
    from ..summary import progress

    p, st = progress(run), run.status()
    return {"run_id": run.id, "name": st.get("name"), "job": st.get("job", "train"), "state": p["state"],
            "step": p["step"], "total": p["total"], "loss": p["last"].get("loss"),
            "val_loss": p["last_val"].get("val_loss"), "eta_s": p["eta_s"], "created_at": st.get("created_at"),
            "started_at": st.get("started_at"), "ended_at": st.get("ended_at"), "error": st.get("error"),
            "restarts": st.get("restarts") or 0, "last_restart": st.get("last_restart"),
            "sweep": read_json(run.path / "sweep.json"), "pipeline": read_json(run.path / "pipeline.json")}  # fmt: skip


class RunsHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self) -> None:
        """Every run, oldest first."""
        rows = [_row(run) for run in self.store.list()]  # a damaged folder reads `damaged`
        self.reply({"runs": rows, "root": str(self.store.root)})

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
        self.reply(_row(run), 201)


class RunHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self, run_id: str) -> None:
        """One run: its row, status, spec and manifest."""
        run = self.run_or_404(run_id)
        self.reply(
            {**_row(run), "status": run.status(), "spec": run.spec.to_dict(), "manifest": run.manifest()}
        )


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
        self.reply({"metrics": lines, "offset": end})


class LogsHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def get(self, run_id: str) -> None:
        """The last `n` lines of the launcher's log, or of a rank's."""
        run = self.run_or_404(run_id)
        n = self.int_arg("n", 100, lo=1)
        rank = self.int_arg("rank", None)
        self.reply({"lines": run.log_tail(min(n or 100, 10_000), rank), "rank": rank})


class ActionHandler(_Base):
    @web.authenticated
    @authorized
    @_handled
    async def post(self, run_id: str, action: str) -> None:
        """stop | resume | evaluate (body: the evaluation's parameters)."""
        run = self.run_or_404(run_id)
        if action == "stop":
            self.reply({"run_id": run.id, "state": run.stop()})
        elif action == "resume":
            run.resume()
            self.reply({"run_id": run.id, "state": run.state})
        else:
            from ..evaluation import evaluate

            ev = evaluate(run, self.body())
            self.reply({"run_id": run.id, "eval_id": ev.id, "state": ev.state}, 202)


ID = r"(?P<run_id>[^/]+)"
ROUTES: list[tuple[str, type[_Base]]] = [
    ("runs", RunsHandler),
    (f"runs/{ID}", RunHandler),
    (f"runs/{ID}/metrics", MetricsHandler),
    (f"runs/{ID}/logs", LogsHandler),
    (f"runs/{ID}/(?P<action>stop|resume|evaluate)", ActionHandler),
]


def routes(base_url: str) -> list[tuple[str, type[_Base]]]:
    return [(url_path_join(base_url, PREFIX, pattern), handler) for pattern, handler in ROUTES]
