"""``python -m tether``: the same as the ``tether`` command."""

import sys

from .cli import main

sys.exit(main())
