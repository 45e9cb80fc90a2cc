"""Allow `python -m collective_model.cli`, equivalent to the `collective` command."""

from . import main

main()
