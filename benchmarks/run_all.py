"""Runs every benchmark script in this folder (each prints its table and writes its JSON).

    python benchmarks/run_all.py [NAME ...]     # e.g. speed; default: all of them
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(names: list[str]) -> list[Path]:
    found = sorted(path for path in HERE.glob("*.py") if path.name != Path(__file__).name)
    if not names:
        return found
    chosen = [path for path in found if path.stem in names]
    missing = sorted(set(names) - {path.stem for path in chosen})
    if missing:
        raise SystemExit(f"no benchmark named {', '.join(missing)}; choose from: {', '.join(p.stem for p in found)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    failures = []
    for script in scripts(sys.argv[1:] if argv is None else argv):
        print(f"== {script.name}", flush=True)
        started = time.time()
        code = subprocess.call([sys.executable, str(script)])
        print(f"== {script.name}: exit {code} after {time.time() - started:.0f} s", flush=True)
        if code:
            failures.append(script.name)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
