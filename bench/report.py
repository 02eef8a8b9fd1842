"""Merge the benchmarks' results into one report: bench/report.md and bench/report.json.

    python bench/report.py        (make bench runs every benchmark, then this)

Reads bench/model_server.json, bench/gateway.json, bench/experiments.json (notebook 03's full
mode), bench/load.json and bench/wire.json; a part that has not been run is listed as "not run". The report
describes the machine, lists every target the issues set with what was measured and whether it was met, then
includes each part's own markdown report.
"""

from __future__ import annotations

import json
import re

from common import OUTPUT, machine, machine_line, markdown_table

PARTS = {  # file stem -> what it measures and the make target that writes it
    "model_server": ("model tier: model_server.py against in-process TensorFlow", "make bench-model-server"),
    "gateway": ("gateway: added latency, CPU, the course's approach, draft mode, install size", "make bench-gateway"),
    "experiments": ("notebook 03, full mode", "make bench-experiments"),
    "load": ("gateway under load: closed loop 1-64 clients, open loop 0.5x-3x capacity", "make bench-load"),
    "wire": ("float32 or uint8 between the tiers: bytes, CPU per request, throughput at 8 clients", "make bench-wire"),
}


def load(stem: str) -> dict | None:
    path = OUTPUT / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def mode_of(document: dict) -> str:
    return str(document.get("mode", "quick" if document.get("quick") else "full"))


def date_of(document: dict) -> str:
    return str(document.get("date") or document.get("machine", {}).get("date") or "?")


def target_row(part: str, t: dict) -> list[str]:
    """One target as a row, whichever way its benchmark recorded it: with a numeric measurement, unit and
    ratio (common.target), or as text."""
    measured = t.get("measured", "")
    if isinstance(measured, int | float):
        measured = f"{measured:.4g} {t.get('unit', '')}".strip()
    required = t["target"] if "name" in t else ""
    ratio = f"{t['ratio']:.4f}" if isinstance(t.get("ratio"), int | float) else ""
    met = t.get("met")
    result = "met" if met is True else "**not met**" if met is False else "not judged"
    return [part, t.get("name", t.get("target", "?")), required, str(measured), ratio, result]


def demoted(markdown: str) -> str:
    """A part's report inside this one: every heading one level down."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def main() -> None:
    here = machine()
    documents = {stem: load(stem) for stem in PARTS}
    status_rows, target_rows, merged_targets = [], [], []
    for stem, (what, command) in PARTS.items():
        document = documents[stem]
        if document is None:
            status_rows.append([stem, what, "**not run**", "", "", f"`{command}`"])
            continue
        status_rows.append(
            [stem, what, "run", mode_of(document), date_of(document), f"bench/{stem}.md, bench/{stem}.json"]
        )
        for t in document.get("targets", []):
            target_rows.append(target_row(stem, t))
            merged_targets.append({"part": stem, **t})
    recorded = {stem: d["machine"] for stem, d in documents.items() if d and "machine" in d}
    others = sorted(
        {f"{stem}: {machine_line(m)}" for stem, m in recorded.items() if m.get("cpu", here["cpu"]) != here["cpu"]}
    )
    lines = [
        "# Benchmark report",
        "",
        f"Written {here['date']}. Machine: {machine_line(here)}.",
        *(["", "Parts recorded on another machine: " + "; ".join(others) + "."] if others else []),
        "",
        "## Parts",
        "",
        markdown_table(["part", "measures", "status", "mode", "run", "files / how to run"], status_rows),
        "",
        "## Targets",
        "",
        markdown_table(
            ["part", "target", "required", "measured", "measured / required", "result"],
            target_rows or [["", "no part recorded targets", "", "", "", ""]],
        ),
        "",
        f"{sum(t.get('met') is True for t in merged_targets)} of {len(merged_targets)} targets met. "
        "Quick-mode runs use small counts: read them as smoke tests, not as measurements.",
        "",
    ]
    pages = [OUTPUT / f"{stem}.md" for stem in PARTS if documents[stem] is not None]
    included = [demoted(page.read_text()).rstrip() + "\n" for page in pages if page.exists()]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "report.md").write_text("\n".join([*lines, *included]))
    report = {
        "machine": here,
        "parts": {
            stem: None
            if d is None
            else {"mode": mode_of(d), "date": date_of(d), "machine": d.get("machine"), "targets": d.get("targets", [])}
            for stem, d in documents.items()
        },
        "targets": merged_targets,
    }
    (OUTPUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUTPUT / 'report.md'} and report.json")


if __name__ == "__main__":
    main()
