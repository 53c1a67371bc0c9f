"""Render the API's OpenAPI document deterministically (``scripts/export_openapi``)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.config import PROJECT_ROOT, Settings

CONTRACT = PROJECT_ROOT / "openapi" / "openapi.json"


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def current_spec() -> dict[str, Any]:
    """The spec of an app built on throwaway settings (no data folder is touched)."""
    from service.main import create_app

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(env="test", home=Path(home), database_url=f"sqlite:///{home}/x.db")
        spec: dict[str, Any] = create_app(settings).openapi()
    return spec


def main() -> None:
    CONTRACT.parent.mkdir(parents=True, exist_ok=True)
    CONTRACT.write_text(render(current_spec()), encoding="utf-8")
    sys.stderr.write(f"wrote {CONTRACT.relative_to(PROJECT_ROOT)}\n")


if __name__ == "__main__":
    main()
