"""`python -m edge_vlm.cli ...` runs `edge-vlm ...`."""

import sys

from .main import main

sys.exit(main())
