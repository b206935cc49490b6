"""Browser-test harness: a private JupyterLab server and a notebook opened in headless Chromium.

Usage::

    with JupyterLab(tmp_path, {"JUPYTER_LLM_HOME": str(home)}) as lab, lab.open_notebook("demo.ipynb") as nb:
        nb.run_all()                      # raises AssertionError when a cell fails
        nb.wait_for(".widget-slider")     # any Playwright selector: CSS, "text=...", ...
        nb.screenshot("demo")             # -> $JUPYTER_LLM_TEST_ARTIFACTS/demo.png

Everything the server, its kernels and Chromium write to $HOME goes to a temporary folder instead;
the server, its kernels and the browser are stopped on exit. Failures raise AssertionError with a
screenshot path, the browser's console errors and the last lines of the server log.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import psutil
import pytest

if TYPE_CHECKING:
    from types import TracebackType

    from playwright.sync_api import BrowserContext, ConsoleMessage, Locator, Page, Playwright

T = TypeVar("T")
_shots = itertools.count()

CHROMIUM = Path("/usr/bin/chromium")
# skip when the browser or playwright is missing, except where it is required (CI sets this)
REQUIRED = os.environ.get("JUPYTER_LLM_REQUIRE_BROWSER") == "1"
MISSING = [what for what, ok in [(f"{CHROMIUM} (make chromium)", CHROMIUM.exists()),
                                 ("playwright", importlib.util.find_spec("playwright") is not None)] if not ok]  # fmt: skip
BROWSER_MARKS = [pytest.mark.browser,
                 pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"missing: {', '.join(MISSING)}")]  # fmt: skip
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# user settings written into the private config dir: every cell attached to the DOM (bqplot needs
# a laid-out element to size itself) and no news/update notifications over the notebook
USER_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def artifacts_dir() -> Path:
    """$JUPYTER_LLM_TEST_ARTIFACTS, else <repo>/test-artifacts (created)."""
    env = os.environ.get("JUPYTER_LLM_TEST_ARTIFACTS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "test-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """`procs` and their living descendants."""
    found = {p.pid: p for p in procs if _alive(p)}
    for p in list(found.values()):
        try:
            found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _stop_processes(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Wait up to `timeout` for `procs` to end, SIGTERM the rest, then SIGKILL (zombies count as ended)."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if sig is not None and _alive(p):
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = [p for p in procs if _alive(p)]
        if not procs:
            return
    raise AssertionError(f"processes survived SIGKILL: {[p.pid for p in procs]}")


class JupyterLab:
    """A `jupyter lab` server on 127.0.0.1 (free port, random token), stopped with its kernels on exit."""

    def __init__(
        self, root_dir: Path | str, env_extra: Mapping[str, str] | None = None, *, timeout: float = 60.0
    ) -> None:
        self.root_dir = Path(root_dir).resolve()
        self.env_extra = dict(env_extra or {})
        self.timeout = timeout
        self.token = secrets.token_hex(16)
        self.base_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def tmp(self) -> Path:
        """Private folder for config, data, runtime, IPython and browser profiles (removed on stop)."""
        assert self._tmp is not None, "JupyterLab is not started"
        return Path(self._tmp.name)

    @property
    def log_path(self) -> Path:
        return self.tmp / "server.log"

    def __enter__(self) -> JupyterLab:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self._tmp is not None and self.log_path.exists():
            shutil.copy(self.log_path, artifacts_dir() / f"jupyter-server-{time.strftime('%H%M%S')}.log")
        self.stop()

    def env(self) -> dict[str, str]:
        """The server's environment (inherited by its kernels)."""
        env = dict(os.environ)
        for var, sub in [
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("IPYTHONDIR", "ipython"),
        ]:
            env[var] = str(self.tmp / sub)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("JUPYTER_TOKEN", None)
        env.update(self.env_extra)
        return env

    def start(self) -> None:
        assert self.proc is None, "already started"
        self._tmp = tempfile.TemporaryDirectory(prefix="jlab-test-")
        settings = self.tmp / "config" / "lab" / "user-settings"
        for name, values in USER_SETTINGS.items():
            file = settings / f"{name}.jupyterlab-settings"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(values))
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={self.root_dir}", "--ServerApp.terminals_enabled=False",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: commands instead of menus
            "--ServerApp.jpserver_extensions=jupyter_lsp=False",  # its `npm prefix -g` writes ~/.npm
        ]  # fmt: skip
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env(), cwd=self.root_dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        info = self.tmp / "runtime" / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.proc.returncode}\n{self.log_tail()}")
            if info.exists() and not self.base_url:
                try:
                    self.base_url = f"http://127.0.0.1:{json.loads(info.read_text())['port']}"
                except (ValueError, KeyError):
                    pass  # being written
            if self.base_url:
                try:
                    self.api("GET", "/api/status", timeout=2)
                    return
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.2)
        raise AssertionError(
            f"jupyter lab did not answer /api/status in {self.timeout:.0f} s\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Shut the server down (it stops its kernels), then end any process it left behind."""
        if self.proc is not None:
            try:
                procs = _descendants([psutil.Process(self.proc.pid)])
            except psutil.NoSuchProcess:
                procs = []
            if self.proc.poll() is None and self.base_url:
                try:
                    self.api("POST", "/api/shutdown", timeout=5)
                    self.proc.wait(timeout=20)
                except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            _stop_processes(procs)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 10.0) -> Any:
        """One REST call with the token; returns the decoded JSON (None for an empty reply)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def start_session(self, path: str, *, kernel: str = "python3", timeout: float = 60.0) -> dict[str, Any]:
        """Create a notebook session (starting its kernel) and wait until the kernel is idle."""
        session: dict[str, Any] = self.api(
            "POST", "/api/sessions",
            {"path": path, "name": Path(path).name, "type": "notebook", "kernel": {"name": kernel}},
        )  # fmt: skip
        self.wait_kernel_idle(session["kernel"]["id"], timeout=timeout)
        return session

    def wait_kernel_idle(self, kernel_id: str, *, timeout: float = 60.0) -> None:
        """Ask the kernel for kernel_info until the server reports it idle.

        The server says "starting" until it sees a status message from the kernel, and only clients'
        requests cause those; one request can come too early for the server's own IOPub subscription.
        """
        from jupyter_client import BlockingKernelClient

        deadline = time.monotonic() + timeout
        client = BlockingKernelClient(connection_file=str(self.tmp / "runtime" / f"kernel-{kernel_id}.json"))
        state = "?"
        try:
            client.load_connection_file()
            client.start_channels(stdin=False, hb=False, control=False)  # heartbeats misfire under load
            client.wait_for_ready(timeout=timeout)
            while time.monotonic() < deadline:
                state = self.api("GET", f"/api/kernels/{kernel_id}")["execution_state"]
                if state == "idle":
                    return
                client.kernel_info()
                time.sleep(0.5)
        except (OSError, RuntimeError) as exc:
            raise AssertionError(f"kernel {kernel_id} did not answer: {exc}\n{self.log_tail()}") from exc
        finally:
            client.stop_channels()
        raise AssertionError(f"kernel {kernel_id} still {state!r} after {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, AssertionError):
            return "(no server log)"
        return "--- server log (tail) ---\n" + "\n".join(text)

    def open_notebook(self, path: str | Path, *, timeout: float = 60.0) -> Notebook:
        """A `Notebook` for `path` (relative to root_dir, or absolute inside it); use it with `with`."""
        return Notebook(self, path, timeout=timeout)


class Notebook:
    """A notebook opened in headless Chromium, attached to a kernel started beforehand (no kernel dialog)."""

    def __init__(
        self,
        lab: JupyterLab,
        path: str | Path,
        *,
        timeout: float = 60.0,
        viewport: tuple[int, int] = (1400, 1000),
    ) -> None:
        p = Path(path)
        self.lab = lab
        self.path = (p.resolve().relative_to(lab.root_dir) if p.is_absolute() else p).as_posix()
        self.timeout = timeout
        self.viewport = viewport
        self.console_errors: list[str] = []
        self.kernel_id = ""
        self._session_id = ""
        self._runs = 0
        self._pw: Playwright | None = None
        self._context: BrowserContext | None = None
        self._page: Page | None = None
        self._browser_procs: list[psutil.Process] = []  # playwright's driver and Chromium

    @property
    def page(self) -> Page:
        assert self._page is not None, "notebook is not open"
        return self._page

    def __enter__(self) -> Notebook:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self._page is not None and not isinstance(exc, _Failure):
            self._try_screenshot("failure")
        self.close()

    def open(self) -> None:
        from playwright.sync_api import sync_playwright

        session = self.lab.start_session(self.path, timeout=self.timeout)
        self._session_id, self.kernel_id = session["id"], session["kernel"]["id"]
        profile = self.lab.tmp / f"chromium-{secrets.token_hex(4)}"
        home = profile / "home"
        home.mkdir(parents=True)
        before = {p.pid for p in psutil.Process().children()}
        self._pw = sync_playwright().start()
        try:
            self._context = self._pw.chromium.launch_persistent_context(
                profile / "user-data",
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": self.viewport[0], "height": self.viewport[1]},
                env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                     "XDG_CACHE_HOME": str(home / ".cache")},
            )  # fmt: skip
            driver = [p for p in psutil.Process().children() if p.pid not in before]
            self._browser_procs = driver  # Chromium runs under playwright's driver
            self._page = self._context.pages[0] if self._context.pages else self._context.new_page()
            self.page.set_default_timeout(self.timeout * 1000)
            self.page.on("console", self._on_console)
            self.page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))
            self.page.goto(f"{self.lab.base_url}/lab/tree/{self.path}?reset&token={self.lab.token}")
            self._attach()
        except BaseException as exc:
            if self._page is not None and not isinstance(exc, _Failure):
                self._try_screenshot("failure-open")
            self.close()
            raise

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def _attach(self) -> None:
        """Wait until JupyterLab shows the notebook and its session uses our kernel, idle."""
        try:
            self.page.wait_for_function("() => window.jupyterapp !== undefined")
            kernel = self.page.evaluate(
                """async (path) => {
                    const app = window.jupyterapp;
                    await app.restored;
                    const w = await app.commands.execute('docmanager:open', {path});
                    await w.context.ready;
                    await w.sessionContext.ready;
                    return w.sessionContext.session?.kernel?.id ?? null;
                }""",
                self.path,
            )
        except Exception as exc:  # playwright's TimeoutError/Error
            self.fail(f"JupyterLab did not open {self.path}: {exc}")
        if kernel != self.kernel_id:
            self.fail(f"notebook attached to kernel {kernel!r}, not the pre-started {self.kernel_id!r}")
        self.wait_for(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")

    def close(self) -> None:
        procs = _descendants(self._browser_procs)
        if self._context is not None:
            try:
                self._context.close()
            except Exception:
                pass
            self._context = None
        self._page = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None
        _stop_processes(procs)
        self._browser_procs = []
        if self._session_id and self.lab.proc is not None:
            try:  # also shuts the kernel down
                self.lab.api("DELETE", f"/api/sessions/{self._session_id}")
            except (OSError, urllib.error.URLError):
                pass
            self._session_id = ""

    # -- running cells ------------------------------------------------------------------------------

    def _run(self, command: str, index: int | None, wait: bool, timeout: float, check: bool) -> None:
        self._runs += 1
        self.page.evaluate(
            """({path, command, index, run}) => {
                const app = window.jupyterapp;
                window.__testRuns = window.__testRuns || {};
                window.__testRuns[run] = null;
                window.__testLastRun = run;
                app.commands.execute('docmanager:open', {path}).then((w) => {
                    if (index !== null) {
                        w.content.activeCellIndex = index;
                        w.content.deselectAll();
                    }
                    return app.commands.execute(command);
                }).then(
                    (r) => { window.__testRuns[run] = {ok: r !== false}; },
                    (e) => { window.__testRuns[run] = {ok: false, error: String(e)}; },
                );
            }""",
            {"path": self.path, "command": command, "index": index, "run": self._runs},
        )
        if wait:
            self.wait_done(timeout=timeout, check=check)

    def run_all(self, *, wait: bool = True, timeout: float = 120.0, check: bool = True) -> None:
        """Run ▸ Run All Cells; with `wait`, until every cell finished (and, with `check`, none failed)."""
        self._run("notebook:run-all-cells", None, wait, timeout, check)

    def run_cell(self, index: int, *, wait: bool = True, timeout: float = 120.0, check: bool = True) -> None:
        """Run cell `index` (0-based) without moving on."""
        self._run("notebook:run-cell", index, wait, timeout, check)

    def wait_done(self, *, timeout: float = 120.0, check: bool = True) -> bool:
        """Wait for the last run_all/run_cell to finish; False when a cell raised (AssertionError if `check`)."""
        try:
            handle = self.page.wait_for_function(
                "() => window.__testRuns && window.__testRuns[window.__testLastRun]", timeout=timeout * 1000
            )
        except Exception:
            self.fail(f"cells of {self.path} still running after {timeout:.0f} s")
        result: dict[str, Any] = handle.json_value()
        if check and not result["ok"]:
            self.fail(f"a cell of {self.path} failed: {result.get('error', '')}\n{self.error_outputs()}")
        return bool(result["ok"])

    def error_outputs(self) -> str:
        """Text of the error and stderr outputs shown in the notebook."""
        outputs = self.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        return "\n".join(outputs.all_inner_texts())

    # -- waiting, screenshots, failures ---------------------------------------------------------------

    def wait_for(self, selector: str, timeout: float = 30.0) -> Locator:
        """The first element matching a Playwright selector (CSS, "text=...") once visible."""
        loc = self.page.locator(selector).first
        try:
            loc.wait_for(state="visible", timeout=timeout * 1000)
        except Exception:
            self.fail(f"{selector!r} not visible after {timeout:.0f} s")
        return loc

    def wait_until(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        what: str = "condition",
        interval: float = 0.2,
    ) -> T:
        """Poll `predicate` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"{what} not met after {timeout:.0f} s (last value {value!r})")
            time.sleep(interval)

    def screenshot(self, name: str) -> Path:
        """Save the page as <artifacts>/<name>.png."""
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=path)
        return path

    def _try_screenshot(self, prefix: str) -> str:
        try:
            stem = Path(self.path).stem
            return str(self.screenshot(f"{prefix}-{stem}-{time.strftime('%H%M%S')}-{next(_shots)}"))
        except Exception as exc:
            return f"(no screenshot: {exc})"

    def fail(self, message: str) -> NoReturn:
        """Raise AssertionError with a screenshot, console errors and the server log tail."""
        shot = self._try_screenshot("failure") if self._page is not None else "(no page)"
        console = "\n".join(self.console_errors[-10:]) or "(none)"
        raise _Failure(
            f"{message}\nscreenshot: {shot}\nbrowser console errors:\n{console}\n{self.lab.log_tail()}"
        )


class _Failure(AssertionError):
    """A failure already reported with a screenshot."""
