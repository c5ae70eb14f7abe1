"""``python -m rlflow``: the same as the ``rlflow`` command."""
import sys

from rlflow.flow.cli import main

sys.exit(main())
