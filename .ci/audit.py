"""The dependency audit of ``make test``: pip-audit over the installed environment.

pip-audit on its own passes silently when it could check nothing: with PyPI's JSON API
out of reach every package is "not found on PyPI" and skipped, and the run says "No known
vulnerabilities found". This says which of three it was:

- a known vulnerability: listed, exit 1 (CI fails);
- the advisory source could not be reached, or answered for no package:
  ``dependency audit skipped: advisory source unreachable (...)``, exit 0 (CI goes on,
  and says so);
- otherwise: how many packages were checked (and which could not be), exit 0.

Arguments after ``--`` go to pip-audit (``-s osv --osv-url URL``, ``--path DIR``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

UNREACHABLE = (
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Max retries exceeded",
    "Could not connect",
    "ServiceError",
    "NameResolutionError",
)


def audit(extra: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        argv = [
            sys.executable, "-m", "pip_audit", "--format", "json", "--output", str(out),
            "--progress-spinner", "off", "--timeout", "10", "--skip-editable", *extra,
        ]  # fmt: skip
        if not any(a.startswith("--path") or a in ("-r", "--requirement") for a in extra):
            argv.append("--local")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        report = json.loads(out.read_text()) if out.exists() and out.stat().st_size else None
    if report is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if any(word in done.stderr for word in UNREACHABLE):
            print(f"dependency audit skipped: advisory source unreachable ({last})")
            return 0
        print(f"dependency audit failed: pip-audit exited {done.returncode}: {last}")
        return 1
    deps = report.get("dependencies", [])
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if d.get("skip_reason")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            print(f"VULNERABLE {dep['name']} {dep.get('version')}: {vuln['id']} (fixed in {fixed})")
    if vulnerable:
        print(f"dependency audit: {len(vulnerable)} package(s) with known vulnerabilities")
        return 1
    checked = len(deps) - len(skipped)
    if deps and checked == 0:
        reason = skipped[0]["skip_reason"]
        print(
            "dependency audit skipped: advisory source unreachable"
            f" (none of {len(deps)} packages could be checked; first: {reason})"
        )
        return 0
    line = f"dependency audit: {checked} packages checked, no known vulnerabilities"
    if skipped:
        names = ", ".join(d["name"] for d in skipped[:10])
        line += f"; {len(skipped)} could not be checked ({names})"
    print(line)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(audit(args[1:] if args[:1] == ["--"] else args))
