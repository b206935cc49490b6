"""The REST API of the jupyter_server extension, against a real server process (auto-enabled
by the installed package): authentication, XSRF, traversal, bad input, real stop/resume."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from browser import JupyterLab

from conftest import REPO, tiny_spec, wait_for
from jupyter_llm.files import append_jsonl
from jupyter_llm.runs import Run, RunStore
from jupyter_llm.server.handlers import ROUTES
from jupyter_llm.spec import Spec

API = "/jupyter-llm/api"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JupyterLab, RunStore]]:
    root = tmp_path_factory.mktemp("api-runs")
    with JupyterLab(tmp_path_factory.mktemp("api-nb"), {"JUPYTER_LLM_RUNS": str(root)}) as lab:
        yield lab, RunStore(root)


def call(lab: JupyterLab, method: str, path: str, token: bool = True, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"token {lab.token}"} if token else {}
    return requests.request(method, lab.base_url + API + path, headers=headers, timeout=30, **kw)


def made_run(store: RunStore, corpus: Path, name: str = "api") -> Run:
    return store.create(Spec.from_dict(tiny_spec(corpus, name=name)))


ENDPOINTS = [("GET", "/runs"), ("POST", "/runs"), ("GET", "/runs/{id}"), ("GET", "/runs/{id}/metrics"),
             ("GET", "/runs/{id}/logs"), ("POST", "/runs/{id}/stop"), ("POST", "/runs/{id}/resume"),
             ("POST", "/runs/{id}/evaluate"), ("POST", "/runs/{id}/generate"), ("GET", "/compare")]  # fmt: skip


def test_every_endpoint_needs_authentication(server: tuple[JupyterLab, RunStore], corpus: Path) -> None:
    lab, store = server
    run = made_run(store, corpus)
    for method, path in ENDPOINTS:
        r = call(lab, method, path.format(id=run.id), token=False, json={})
        assert r.status_code == 403, (method, path, r.status_code)
    assert call(lab, "GET", "/runs").status_code == 200


def test_cookie_posts_need_the_xsrf_token(server: tuple[JupyterLab, RunStore], corpus: Path) -> None:
    lab, store = server
    run = made_run(store, corpus, "xsrf")
    s = requests.Session()
    assert s.get(f"{lab.base_url}/lab?token={lab.token}", timeout=30).status_code == 200  # login cookie
    assert "_xsrf" in s.cookies
    assert s.get(f"{lab.base_url}{API}/runs", timeout=30).status_code == 200  # reads with the cookie
    r = s.post(f"{lab.base_url}{API}/runs/{run.id}/stop", timeout=30)
    assert r.status_code == 403  # a forged cross-site POST carries the cookie but not the token
    r = s.post(
        f"{lab.base_url}{API}/runs/{run.id}/stop", headers={"X-XSRFToken": s.cookies["_xsrf"]}, timeout=30
    )
    assert r.status_code == 409 and "never started" in r.json()["message"]


def test_listing_detail_incremental_metrics_and_logs(
    server: tuple[JupyterLab, RunStore], corpus: Path
) -> None:
    lab, store = server
    run = made_run(store, corpus, "detail")
    (run.path / "sweep.json").write_text(json.dumps({"sweep_id": "s1", "trial": 3}))
    rows = {r["run_id"]: r for r in call(lab, "GET", "/runs").json()["runs"]}
    assert rows[run.id]["state"] == "created" and rows[run.id]["sweep"]["trial"] == 3
    detail = call(lab, "GET", f"/runs/{run.id}").json()
    assert detail["spec"]["name"] == "detail" and detail["status"]["state"] == "created"
    for step in (5, 10):
        append_jsonl(run.path / "metrics.jsonl", {"step": step, "loss": 3.0})
    first = call(lab, "GET", f"/runs/{run.id}/metrics").json()
    assert [m["step"] for m in first["metrics"]] == [5, 10]
    append_jsonl(run.path / "metrics.jsonl", {"step": 15, "loss": 2.0})
    more = call(lab, "GET", f"/runs/{run.id}/metrics", params={"offset": first["offset"]}).json()
    assert [m["step"] for m in more["metrics"]] == [15]  # only what is new since the offset
    (run.path / "logs" / "rank1.log").write_text("".join(f"line {i}\n" for i in range(50)))
    assert call(lab, "GET", f"/runs/{run.id}/logs", params={"rank": 1, "n": 3}).json()["lines"] == [
        "line 47", "line 48", "line 49"]  # fmt: skip
    # a run id may be a unique prefix or the run's name, as everywhere else
    r = call(lab, "GET", "/runs/detail")
    assert r.json().get("run_id") == run.id, r.text + lab.log_tail(60)


def test_bad_input_gets_4xx_with_a_message_never_500(
    server: tuple[JupyterLab, RunStore], corpus: Path
) -> None:
    lab, store = server
    run = made_run(store, corpus, "bad")
    cases = [
        ("GET", f"/runs/{run.id}/metrics", {"params": {"offset": "abc"}}, 400, "offset must be an integer"),
        ("GET", f"/runs/{run.id}/metrics", {"params": {"offset": "-1"}}, 400, "offset must be >= 0"),
        ("GET", f"/runs/{run.id}/logs", {"params": {"n": "0"}}, 400, "n must be >= 1"),
        ("POST", "/runs", {"data": "{not json"}, 400, "not JSON"),
        ("POST", "/runs", {"json": [1, 2]}, 400, "JSON object"),
        ("POST", "/runs", {"json": {"spec": "x"}}, 400, "a spec mapping"),
        ("POST", "/runs", {"json": {"spec": {"data": {"train": "/nowhere.txt"}}}}, 400, "no file matches"),
        (
            "POST",
            "/runs",
            {"json": {"spec": {"data": {"train": str(corpus)}}, "overrides": [3]}},
            400,
            "key=value",
        ),
        ("POST", f"/runs/{run.id}/resume", {}, 409, "stop it before resuming"),
        ("POST", f"/runs/{run.id}/evaluate", {"json": {"checkpoint": "best"}}, 400, "checkpoint"),
        ("POST", f"/runs/{run.id}/evaluate", {"json": {}}, 409, "no final model"),
        ("GET", "/runs/no-such-run", {}, 404, "no run"),
    ]
    for method, path, kw, status, text in cases:
        r = call(lab, method, path, **kw)
        assert r.status_code == status and text in r.json()["message"], (
            method,
            path,
            kw,
            r.status_code,
            r.text,
        )
    r = call(lab, "POST", "/runs", json={"spec": {"data": {"train": str(corpus)}, "optim": {"lr": -1}}})
    assert r.status_code == 400 and r.json()["problems"][0]["field"] == "optim.lr"


def test_fuzz_every_endpoint_and_parameter_never_gives_500(
    server: tuple[JupyterLab, RunStore], corpus: Path
) -> None:
    """Random and boundary values for every path, query parameter and body, 2,400 requests on
    loopback: each gets a 2xx/4xx reply (a created run, a damaged one, and ids that are none)."""
    import random
    from urllib.parse import quote

    lab, store = server
    run = made_run(store, corpus, "fuzz")
    damaged = made_run(store, corpus, "fuzz-damaged")
    (damaged.path / "status.json").write_text('{"state": "runn')
    rng = random.Random(18)
    numbers = ["0", "1", "-1", "2", "10000", "10001", str(2**62), str(2**62 + 1), str(2**63), "1" + "0" * 29,
               "1e29", "-0", "0x10", "1.5", "nan", "inf", "", " ", "abc", "9" * 5000, "\u00e9", "%00"]  # fmt: skip
    ids = [run.id, damaged.id, "..", "%2e%2e", ".", "latest", "a" * 300, "x%2fy", "%ff", "\u2603", "-", "_x"]

    def junk() -> Any:
        return rng.choice([None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x" * 10_000, [], {}, [1, {"a": []}],
                           {"spec": None}, "../../etc/passwd", "optim.lr=abc"])  # fmt: skip

    def body() -> dict[str, Any]:
        spec = tiny_spec(corpus, name="fuzz", data={"train": [str(corpus.parent / "never-there.txt")]})
        for _ in range(rng.randint(0, 3)):  # the data never exists: no fuzzed spec can start a run
            section = rng.choice([k for k in spec if isinstance(spec[k], dict)])
            key = rng.choice([*spec[section], "unknown"])
            spec[section][key] = junk()
        kind = rng.randrange(9)
        if kind == 0:
            return {"data": bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))}
        if kind == 1:
            return {"data": b'{"spec": "\xff\xfe"}'}
        if kind == 2:
            return {"data": "[" * 100_000 + "]" * 100_000}
        if kind == 3:
            return {"data": b" " * (1 << 20) + b"{}"}
        if kind == 4:
            return {"data": json.dumps(junk())}
        if kind == 5:
            return {
                "data": json.dumps(
                    {"spec": spec, "overrides": rng.choice([[], ["optim.lr=abc"], [1], "x", [junk()]])}
                )
            }
        if kind == 6:
            return {
                "data": json.dumps(
                    {rng.choice(["checkpoint", "prompts", "max_new_tokens", "split", "x"]): junk()}
                )
            }
        return {"data": json.dumps({"spec": spec})}  # NaN and huge numbers too

    session = requests.Session()
    session.headers["Authorization"] = f"token {lab.token}"
    seen: dict[int, int] = {}
    for i in range(2400):
        method, path = ENDPOINTS[i % len(ENDPOINTS)]
        target = path.format(id=quote(rng.choice(ids), safe="%"))
        params = {k: rng.choice(numbers) for k in rng.sample(["offset", "n", "rank", "x"], rng.randint(0, 3))}
        kw: dict[str, Any] = body() if method == "POST" else {}
        r = session.request(method, lab.base_url + API + target, params=params, timeout=30, **kw)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, target, params, str(kw)[:300], r.status_code, r.text[:500])
    assert {200, 400, 404, 409} <= set(seen), seen  # the fuzz reached the handlers, not only the router
    assert RunStore(store.root).get(run.id).state == "created"  # and started nothing
    listed = {r["run_id"]: r for r in call(lab, "GET", "/runs").json()["runs"]}
    assert (
        listed[damaged.id]["state"] == "damaged"
        and "status.json cannot be read" in listed[damaged.id]["error"]
    )
    assert listed[run.id]["state"] == "created"  # the damaged folder hides no other run


def test_run_ids_never_reach_outside_the_root(server: tuple[JupyterLab, RunStore], corpus: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    lab, store = server
    outside = RunStore(tmp_path / "elsewhere").create(Spec.from_dict(tiny_spec(corpus, name="secret")))
    os.symlink(outside.path, store.root / "20990101-000000-000-link-0000")
    base = f"{lab.base_url}{API}/runs/"
    for raw in ["..", "../..", "%2e%2e", "..%2f..%2fetc", "%2E%2E%2F%2E%2E", "%2fetc%2fpasswd", ".hidden",
                "20990101-000000-000-link-0000", "20990101-000000-000-link-0000/metrics", "..%5c..",
                str(outside.path).replace("/", "%2F"), "%00", "a" * 300]:  # fmt: skip
        r = requests.get(base + raw, headers={"Authorization": f"token {lab.token}"}, timeout=30)
        assert 400 <= r.status_code < 500, (raw, r.status_code)
        assert not any(k in r.text for k in ('"run_id"', '"spec"', '"metrics"', '"lines"')), (raw, r.text)
    r = requests.get(f"{lab.base_url}{API}/runs/../../api/status", headers={"Authorization": f"token {lab.token}"},
                     timeout=30, allow_redirects=False)  # fmt: skip
    assert '"run_id"' not in r.text and outside.id not in r.text


def test_openapi_matches_the_handlers() -> None:
    spec = yaml.safe_load((REPO / "jupyter_llm" / "server" / "openapi.yaml").read_text())
    documented = {(path, m.upper()) for path, ops in spec["paths"].items() for m in ops if m != "parameters"}
    served = set()
    for pattern, handler in ROUTES:
        path = "/" + re.sub(r"\(\?P<run_id>[^)]*\)", "{run_id}", pattern)
        paths = [re.sub(r"\(\?P<action>([^)]*)\)", a, path) for a in re.search(r"\(\?P<action>([^)]*)\)", path)
                 .group(1).split("|")] if "<action>" in path else [path]  # fmt: skip
        methods = [m.upper() for m in ("get", "post", "put", "delete", "patch") if m in handler.__dict__]
        served |= {(p, m) for p in paths for m in methods}
    assert served == documented


@pytest.mark.deepspeed
def test_launch_stop_resume_through_the_api(server: tuple[JupyterLab, RunStore], corpus: Path) -> None:
    lab, store = server
    spec = tiny_spec(
        corpus, name="via-api", train={"max_steps": 400, "log_every": 5, "save_every": 0, "eval_every": 0}
    )
    r = call(lab, "POST", "/runs", json={"spec": spec, "overrides": ["train.max_steps=300"]})
    assert r.status_code == 201, r.text
    run = store.get(r.json()["run_id"])
    assert run.spec.train.max_steps == 300
    wait_for(lambda: any("loss" in m for m in run.metrics()), 300, "a training step")
    r = call(lab, "POST", f"/runs/{run.id}/stop")
    assert r.status_code == 200 and r.json()["run_id"] == run.id
    assert run.wait(300) == "stopped"
    steps_at_stop = max(m["step"] for m in run.metrics())
    r = call(lab, "POST", f"/runs/{run.id}/resume")
    assert r.status_code == 200 and r.json()["state"] in ("resuming", "running", "starting")
    # it trains again, from its checkpoint
    wait_for(lambda: max(m["step"] for m in run.metrics()) > steps_at_stop, 300, "a step after the resume")
    run.stop()
    assert run.wait(300) == "stopped"
