"""What both command lines share: the one exception type they print as a single clear line, and
the runner that does it.

``ted-prep`` (``data_prep.cli``) and ``ted-ds`` (``ted_ds.cli``) both import this module; it lives
in ``data_prep`` because that is the lower package (training reads its files, never the reverse).
``ted_ds.errors`` only adds training's subclasses of ``UserError``.
"""

import os
import sys


class UserError(Exception):
    """Bad input, bad configuration or a bad file: the message says what and where.

    Entry points print ``<prog>: error: <message>`` and exit with status 2, no traceback.
    """


def run_cli(prog: str, command, interrupted: str) -> int:
    """Run ``command()``; a ``UserError`` becomes one line on stderr and status 2."""
    try:
        return command()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f"rank {rank}: "
        sys.stderr.write(f"{prog}: {where}error: {e}\n")  # one write: ranks sharing a pipe never split a line
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
