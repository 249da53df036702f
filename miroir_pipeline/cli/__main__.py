"""``python -m miroir_pipeline.cli``: how ``import`` and ``reshard`` start their workers."""

import sys

from miroir_pipeline.cli.app import main

sys.exit(main())
