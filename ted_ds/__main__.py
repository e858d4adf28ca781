import sys

from ted_ds.cli import main

sys.exit(main())
