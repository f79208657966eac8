"""Where every bench writes: OUT.json (the measurements, keys sorted) and OUT.md (the table a
person reads), side by side, and one line saying so."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out, result: dict, markdown: str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
