"""mypy on the package against a committed baseline that may only shrink.

    python ci/mypy_baseline.py            # fails on a finding not in ci/mypy-baseline.txt, or on a
                                          # baseline entry that no longer occurs (then --update)
    python ci/mypy_baseline.py --update   # rewrite the baseline from mypy's findings now

Findings are compared without their line numbers (``path: [code] message``, counted), so that edits
elsewhere in a file do not disturb them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "ci" / "mypy-baseline.txt"
FINDING = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*?)\s+\[(?P<code>[\w-]+)\]$")


def findings() -> Counter[str]:
    """mypy's errors on the package (configured in pyproject.toml), without line numbers."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty", "--show-error-codes"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or proc.stderr.strip():
        raise SystemExit(f"mypy did not run (exit {proc.returncode}):\n{proc.stderr}{proc.stdout[-2000:]}")
    out: Counter[str] = Counter()
    for line in proc.stdout.splitlines():
        m = FINDING.match(line)
        if m:
            out[f"{m['path']}: [{m['code']}] {m['message']}"] += 1
    return out


def read_baseline() -> Counter[str]:
    lines = BASELINE.read_text().splitlines() if BASELINE.exists() else []
    return Counter(line for line in lines if line and not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write mypy's findings now as the baseline")
    args = parser.parse_args(argv)
    now = findings()
    if args.update:
        header = "# mypy findings accepted for now (ci/mypy_baseline.py); fix them, never add to them\n"
        BASELINE.write_text(header + "".join(f"{key}\n" for key in sorted(now.elements())))
        print(f"{sum(now.values())} findings written to {BASELINE.relative_to(ROOT)}")
        return 0
    base = read_baseline()
    new, fixed = now - base, base - now
    for key in sorted(new.elements()):
        print(f"new mypy finding: {key}")
    for key in sorted(fixed.elements()):
        print(f"fixed, still in the baseline: {key}")
    if fixed and not new:
        print("the baseline shrinks: run `python ci/mypy_baseline.py --update` and commit it")
    print(f"mypy: {sum(now.values())} findings, baseline {sum(base.values())}, new {sum(new.values())}, "
          f"fixed {sum(fixed.values())}")
    return 1 if new or fixed else 0


if __name__ == "__main__":
    sys.exit(main())
