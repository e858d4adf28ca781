"""The test harness: what the tests build, launch and record with, but which is not a test itself.
Tiny real models and datasets (``tiny``), the launch helpers every multi-rank test goes through
(``common``: the bundled corpus, ``run_launcher``, ``deepspeed_cmd``, ``needs``, ``record_fault``),
a local SLURM cluster (``slurm_cluster``) and two hosts in network namespaces (``netns_hosts``) for
the launcher tests, and in ``mp/`` the scripts that multi-rank tests start under ``deepspeed`` by
path (they put ``tests/`` on ``sys.path`` to import this package). Fixtures and hooks stay in
``tests/conftest.py``; tests import the rest from here (``from harness.common import ...``)."""
