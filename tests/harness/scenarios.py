"""The records of one ``run_scenarios.py`` launch, read so that a scenario that broke fails only the tests
that read it: one breakage, one failing test, not every test of the launch."""

from __future__ import annotations

import json
import os

import pytest

from harness.common import deepspeed_cmd, run_launcher


class Scenarios:
    def __init__(self, dirs: dict[str, str], configs: dict[str, str], results: dict[str, dict], launch_tail: str):
        self.dirs, self.configs, self.results, self.launch_tail = dirs, configs, results, launch_tail

    def record(self, name: str) -> dict:
        """The scenario's record; the test fails with its traceback if it raised, or with the launch's output
        if the launch died before it."""
        if name not in self.results:
            pytest.fail(f"scenario {name} never ran; the launch ended with:\n{self.launch_tail}")
        if "raised" in self.results[name]:
            pytest.fail(f"scenario {name} raised:\n{self.results[name]['raised']}")
        return self.results[name]

    def dir(self, name: str) -> str:
        """The scenario's output directory, once it ran through."""
        self.record(name)
        return self.dirs[name]

    def records(self) -> dict[str, dict]:
        """Every scenario that ran through (the others fail their own tests)."""
        return {n: r for n, r in self.results.items() if "raised" not in r}


def launch_scenarios(ranks: int, spec: list[dict], dirs: dict[str, str], configs: dict[str, str], spec_path: str,
                     timeout: float) -> Scenarios:
    """One launch of run_scenarios.py over ``spec``; a launch that fails part-way keeps the records written."""
    out = spec_path.removesuffix(".json") + "-results.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    launch = run_launcher(deepspeed_cmd(ranks, "tests/harness/mp/run_scenarios.py", "--spec", spec_path,
                                        "--out", out), timeout=timeout, check=False)
    results = json.load(open(out)) if os.path.exists(out) else {}
    return Scenarios(dirs, configs, results, (launch.stdout + launch.stderr)[-6000:])
