"""The GPU check's resumable sections: a finished section's figures are kept as JSON under the work
directory and a later call with the same work directory reuses them instead of measuring again; a
time budget stops the check between sections (never inside one) and says what is left.

A GPU slot is short and may end mid-check: what it measured stays, and the next slot goes on from
there.  A section whose phases failed keeps nothing, so it runs again next time.
"""

from __future__ import annotations

import hashlib
import json
import os

IGNORED = ("phases", "sections")  # the call's own bookkeeping, not a section's figures


def shape_key(shape: dict) -> str:
    """Names the sizes a work directory was built for: other sizes get other models, data and results."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=list).encode()).hexdigest()[:12]


def result_path(work: str, name: str) -> str:
    return os.path.join(work, "results", f"{name}.json")


def load_done(work: str, name: str) -> dict | None:
    """The saved figures and phases of section ``name`` (``save_done``), or None when it has not finished."""
    path = result_path(work, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_done(work: str, name: str, figures: dict, phases: list[dict]) -> None:
    """Section ``name`` finished: its figures and phases, written whole or not at all (a cut-off write
    must not pass for a finished section)."""
    path = result_path(work, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"figures": figures, "phases": phases}, f, indent=2)
    os.replace(path + ".tmp", path)


def fingerprints(result: dict) -> dict[str, str]:
    """Each figure of ``result`` as text, to find what a section changed (it may change lists in place)."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in result.items() if k not in IGNORED}


def changed(before: dict[str, str], result: dict) -> dict:
    """The figures of ``result`` that are new or differ from ``before`` (``fingerprints``)."""
    now = fingerprints(result)
    return {k: result[k] for k, text in now.items() if before.get(k) != text}


def fits(estimate_s: float, budget_s: float | None, elapsed_s: float) -> bool:
    """Whether a section estimated at ``estimate_s`` still ends within the budget (None: no budget)."""
    return budget_s is None or elapsed_s + estimate_s <= budget_s


def left_line(budget_s: float, elapsed_s: float, stopped: str, estimate_s: float, left: list[str], work: str) -> str:
    """The one line a check stopped by its budget prints: where it stopped, why, and what is left."""
    return (f"gpu-check: budget {budget_s:.0f} s: stopped before {stopped} (estimated {estimate_s:.0f} s, "
            f"{max(0.0, budget_s - elapsed_s):.0f} s left); left: {', '.join(left)} — run again with "
            f"--work {work} to go on")
