"""``python -m iteris_core``: see :mod:`iteris_core.cli`."""

import sys

from .cli import main

sys.exit(main())
