"""``python -m miroir_pipeline.cli``: how ``import`` and ``reshard`` start their workers."""

from miroir_pipeline.cli.app import program

program()
