"""The jupyter_server extension: a REST API over the runs root under `/jupyter-llm/api/`.

Every handler is authenticated and authorized through jupyter_server (token or cookie + XSRF);
run ids are resolved only among the runs root's own folders (never a path, never a symlink).
`openapi.yaml` beside this file describes the API; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_llm.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from ..folder import default_root
    from .handlers import routes

    web_app = serverapp.web_app
    base = web_app.settings["base_url"]
    web_app.settings.setdefault("jupyter_llm_root", str(default_root().resolve()))
    web_app.add_handlers(".*$", routes(base))
    serverapp.log.info("jupyter_llm: REST API at %sjupyter-llm/api/ over %s", base,
                       web_app.settings["jupyter_llm_root"])  # fmt: skip
