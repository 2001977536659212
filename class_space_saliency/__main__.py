"""``python -m class_space_saliency`` = the ``class-space-saliency`` command."""

import sys

from .cli import main

sys.exit(main())
