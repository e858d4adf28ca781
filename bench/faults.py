"""The "Faults survived" table, generated from the fault tests' own observations.

    python -m bench faults            (after `make test`, or `pytest -m multirank tests/test_faults.py ...`)

Each fault test, once its assertions passed, leaves one row in ``.cache/faults/`` (tests/harness/common.py,
``record_fault``): the fault, what the user saw (the actual error line or exit status), what was
kept.  This collects the rows into bench/results/faults.json and rewrites the table between the
markers in BENCHMARKS.md; a fault whose test did not pass in the run has no row.
"""

from __future__ import annotations

import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = os.path.join(REPO, ".cache", "faults")
BEGIN, END = "<!-- faults:begin (python -m bench faults) -->", "<!-- faults:end -->"


def table(rows: list[dict]) -> str:
    lines = ["| fault | what the user sees | what is kept | test |", "|---|---|---|---|"]
    for r in rows:
        cells = (r["fault"], r["sees"], r["kept"], r["test"].split("::")[-1])
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    rows = sorted((json.load(open(p)) for p in glob.glob(os.path.join(ROWS, "*.json"))), key=lambda r: r["test"])
    if not rows:
        sys.exit(f"no fault rows in {ROWS}: run the fault tests first (make test)")
    with open(os.path.join(REPO, "bench", "results", "faults.json"), "w") as f:
        json.dump(rows, f, indent=1)
    path = os.path.join(REPO, "BENCHMARKS.md")
    text = open(path).read()
    if BEGIN not in text:
        sys.exit(f"{path}: no {BEGIN} marker to write the table after")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
