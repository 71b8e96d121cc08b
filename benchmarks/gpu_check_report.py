"""The GPU check's summary: ``python benchmarks/gpu_check_report.py WORK [OUT_FILE]``.

``benchmarks/gpu_check.sh`` calls this after every step (and from a background loop while
a step runs), so the summary is always current: it reads the work folder the check writes
into (``meta.tsv``, ``plan.tsv``, ``steps.tsv``, ``current.tsv``, the steps' JUnit XML and
JSON, ``preflight.json``, the benchmarks' ``*.short.md``) and writes ``WORK/summary.md`` and
``WORK/steps.json``, and ``OUT_FILE`` atomically when given. Standard library only: it
must work where torch or anything else is missing.

The summary's first line is the verdict (``ok``, ``FAILED``, ``RUNNING`` or
``INTERRUPTED``), then the preflight line, one row per planned step (status, seconds,
time limit, what came out of it: test counts and failed tests, benchmark records), and the
short table of each benchmark that has finished.
"""

from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SHOWN_FAILURES = 5


def read_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def junit_detail(path: Path) -> str:
    """``"12 passed, 1 failed, 3 skipped; failed: a::b"`` from a pytest JUnit file."""
    if not path.exists():
        return "no JUnit file"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return f"unreadable JUnit file ({e})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    if counts["tests"] == 0:
        return "no tests selected"
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - skipped
    parts = [f"{passed} passed"]
    parts += [f"{counts['failures']} failed"] if counts["failures"] else []
    parts += [f"{counts['errors']} errors"] if counts["errors"] else []
    parts += [f"{skipped} skipped"] if skipped else []
    text = ", ".join(parts)
    if failed:
        more = f" (+{len(failed) - SHOWN_FAILURES} more)" if len(failed) > SHOWN_FAILURES else ""
        text += "; failed: " + ", ".join(failed[:SHOWN_FAILURES]) + more
    return text


def json_detail(paths: list[Path]) -> str:
    """Records (and records with an error) in benchmark result files."""
    if not paths:
        return "no result file"
    parts = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            parts.append(f"{path.name}: unreadable ({type(e).__name__})")
            continue
        records = data.get("results", data.get("records", [])) if isinstance(data, dict) else []
        errors = sum(1 for r in records if isinstance(r, dict) and r.get("error"))
        parts.append(
            f"{path.name}: {len(records)} records" + (f", {errors} with errors" if errors else "")
        )
    return "; ".join(parts)


def step_detail(work: Path, name: str, kind: str, args: list[str]) -> str:
    if kind in ("tests", "compile"):
        return junit_detail(work / f"tests-{name}.xml")
    if kind == "bench" and args:
        return json_detail(
            [work / f"{args[0]}.json"] if (work / f"{args[0]}.json").exists() else []
        )
    if kind == "e2e":
        return json_detail(sorted(work.glob("e2e-*.json")))
    if kind == "preflight":
        try:
            return json.loads((work / "preflight.json").read_text()).get("summary", "")
        except (OSError, ValueError):
            return ""
    note = work / f"{name}.txt"
    return note.read_text().strip().splitlines()[-1] if note.exists() else ""


def build(work: Path) -> tuple[str, dict]:
    meta = dict(row[:2] for row in read_tsv(work / "meta.tsv") if len(row) >= 2)
    plan = read_tsv(work / "plan.tsv")  # name, limit, kind, args...
    done = {row[0]: row for row in read_tsv(work / "steps.tsv")}  # name, status, rc, s, limit
    current = read_tsv(work / "current.tsv")
    running = current[0] if current else None
    now = time.time()
    steps = []
    for row in plan:
        name, limit, kind, args = row[0], int(row[1]), row[2], row[3:]
        step = {"name": name, "kind": kind, "args": args, "limit_s": limit}
        if name in done:
            _, status, rc, seconds, used_limit = done[name][:5]
            step |= {"status": status, "rc": int(rc), "seconds": int(seconds)}
            step["limit_s"] = int(used_limit)
            step["note"] = done[name][5] if len(done[name]) > 5 else ""
        elif running and running[0] == name:
            step |= {"status": "running", "seconds": int(now - float(running[1]))}
            step["limit_s"] = int(running[2])
        else:
            step["status"] = "not run"
        idle = step["status"] in ("not run", "skipped")
        step["detail"] = "" if idle else step_detail(work, name, kind, args)
        steps.append(step)

    bad = [s for s in steps if s["status"] in ("failed", "timeout", "killed")]
    if meta.get("interrupted"):
        verdict = f"INTERRUPTED ({meta['interrupted']})"
    elif running or meta.get("finished") != "1":
        verdict = "RUNNING"
    elif bad or meta.get("preflight_failed") == "1":
        verdict = "FAILED"
    else:
        verdict = "ok"
    if bad:
        verdict += f": {len(bad)} of {len(steps)} steps " + ", ".join(
            f"{s['name']} {s['status']}" for s in bad
        )
    planned = sum(s["limit_s"] for s in steps)
    start = float(meta.get("start_epoch", now))
    if "end_epoch" in meta:
        elapsed = f"took {int(float(meta['end_epoch']) - start)} s"
    else:
        elapsed = f"{int(now - start)} s so far (as of {time.strftime('%H:%M:%S')})"
    title = (
        f"# gpu_check {verdict}\n\n"
        f"areas: {meta.get('areas', '?')} · {'quick' if meta.get('quick') == '1' else 'full'}"
        f"{' · CPU dry run' if meta.get('cpu') == '1' else ''} · started {meta.get('started', '?')}"
        f" · {elapsed} · step limits sum to "
        f"{planned} s" + (f" · budget {meta['budget']} s" if meta.get("budget") else "") + "\n\n"
    )
    pre = next((s["detail"] for s in steps if s["kind"] == "preflight"), "")
    lines = [title + (pre + "\n\n" if pre else "")]
    lines.append("| step | status | s | limit s | detail |\n|---|---|---|---|---|\n")
    for s in steps:
        status = s["status"] if s["status"] == "ok" else s["status"].upper()
        if s.get("note"):
            status += f" ({s['note']})"
        detail = s["detail"].replace("|", "/") if s["kind"] != "preflight" else "see above"
        lines.append(
            f"| {s['name']} | {status} | {s.get('seconds', '')} | {s['limit_s']} | {detail} |\n"
        )
    tables = [p.read_text().strip() for p in sorted(work.glob("*.short.md"), key=os.path.getmtime)]
    for path in sorted(work.glob("e2e-*.md")):  # the end-to-end table, without its preamble
        rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
        tables += [f"## end to end ({path.name})\n\n" + "\n".join(rows)] if rows else []
    if tables:
        lines.append("\n## Benchmarks (short tables; full JSON and markdown in the archive)\n\n")
        lines.append("\n\n".join(tables) + "\n")
    files = sorted(p.name for p in work.iterdir() if p.is_file())
    lines.append(f"\narchive contents: {', '.join(files)}\n")
    return "".join(lines), {"verdict": verdict, "meta": meta, "steps": steps}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    work = Path(argv[0])
    text, data = build(work)
    write_atomic(work / "steps.json", json.dumps(data, indent=1))
    write_atomic(work / "summary.md", text)
    if len(argv) == 2:
        write_atomic(Path(argv[1]), text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
