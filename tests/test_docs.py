"""The reference pages in docs/reference/ are what docs/generate.py makes from the code today:
a field, command, magic, endpoint or run-folder name added or changed without `make docs`
fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "generate.py")
assert spec is not None and spec.loader is not None
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.mark.parametrize("page", sorted(generate.PAGES))
def test_reference_page_is_current(page: str) -> None:
    on_disk = (ROOT / "docs" / "reference" / page).read_text(encoding="utf-8")
    assert on_disk == generate.PAGES[page](), f"docs/reference/{page} is stale: run `make docs`"


def test_every_spec_field_has_a_meaning() -> None:
    rows = [line for line in generate.spec_md().splitlines() if line.startswith("| `")]
    assert len(rows) > 80 and [r for r in rows if r.endswith("|  |")] == []


@pytest.mark.parametrize("path", sorted(generate.GENERATED, key=str), ids=lambda p: p.name)
def test_api_schemas_and_types_are_current(path: Path) -> None:
    """openapi.yaml's schemas and the labextension's api.ts come from the server's pydantic
    models (jupyter_llm/server/models.py): a model changed without `make docs` fails here."""
    assert path.read_text(encoding="utf-8") == generate.GENERATED[path](), (
        f"{path.name} is stale: run `make docs`"
    )
