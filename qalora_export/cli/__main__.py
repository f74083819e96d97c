"""``python -m qalora_export.cli`` (as ``torchrun -m qalora_export.cli train ...`` runs it)."""

import sys

from qalora_export.cli import main

sys.exit(main())
