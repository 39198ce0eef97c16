"""The report of ``scripts/gpu-check.sh``: ``OUT/report.json`` and ``OUT/report.md`` from its step logs.

    python scripts/gpu_report.py gpu-check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def last_json(path: Path) -> Any:
    """The last line of ``path`` that parses as JSON (None when there is none)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _build_record(path: Path) -> Any:
    """The build record (indented JSON) at the end of a ``dlm-convert --engine`` log, or None."""
    text = path.read_text() if path.is_file() else ""
    start = text.rfind("\n{\n")
    try:
        return json.loads(text[start + 1 :] if start >= 0 else text)
    except ValueError:
        return None


def main(out: Path) -> int:
    """Gather the steps, versions, loads and benchmarks of ``out``; write and print the report."""
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    report: dict[str, Any] = {"steps": steps, "versions": last_json(out / "versions.log"), "engines": {},
                              "loads": {}, "bench": {}}
    for step in steps:
        name = step["step"]
        if name.startswith("engine-"):  # dlm-convert --engine prints the build record last
            report["engines"][name] = _build_record(out / f"{name}.log")
        if name.startswith("load-"):
            report["loads"][name] = last_json(out / f"{name}.log")
        if name.startswith("bench-"):
            bench = out / name / "bench.json"
            report["bench"][name] = json.loads(bench.read_text())["engine"]["summary"] if bench.is_file() else None
    lines = ["# GPU check", "", f"Versions: `{json.dumps(report['versions'])}`", "", "| step | exit | seconds |",
             "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    lines += ["", "## Native engines", ""]
    for name, record in report["engines"].items():
        if not record:
            lines.append(f"- {name}: no build record (see {name}.log)")
            continue
        built = ", ".join(f"{role} {g['build_s']} s, {g['bytes'] / 1e6:.0f} MB" for role, g in record["graphs"].items())
        lines.append(f"- {name}: {record['dtype']}; {built}; device `{json.dumps(record['device'])}`")
    lines += ["", "## Loads", ""]
    lines += [f"- {name}: `{json.dumps(load)}`" for name, load in report["loads"].items()]
    for path in sorted(out.glob("serve-load-*.json")):
        runs = json.loads(path.read_text()).get("runs", {})
        report.setdefault("serve_load", {})[path.stem] = runs
        lines += ["", f"## {path.stem}", "", "| server | clients | requests/s | p50 ms | p95 ms | with text | refused |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {server} | {r['clients']} | {r['per_second']} | {r['p50_ms']} | {r['p95_ms']} | {r['with_text']} "
                  f"| {r['refused_429']} |" for server, levels in runs.items() for r in levels]
    for name in report["bench"]:
        md = out / name / "bench.md"
        lines += ["", f"## {name}", "", md.read_text() if md.is_file() else f"no report (see {name}.log)"]
    failed = [s["step"] for s in steps if s["rc"] != 0]
    lines += ["", f"Failed steps: {', '.join(failed) or 'none'}."]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")))
