"""``python -m rnip_ext``: the ``rnip`` command."""

import sys

from .cli import main

sys.exit(main())
