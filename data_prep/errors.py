"""The one exception type that command-line entry points turn into a single clear line."""


class UserError(Exception):
    """Bad input, bad configuration or a bad file: the message says what and where.

    Entry points print ``<prog>: error: <message>`` and exit with status 2, no traceback.
    """


def run_cli(prog: str, command, interrupted: str) -> int:
    """Run ``command()``; a ``UserError`` becomes one line on stderr and status 2."""
    import os
    import sys

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
