"""``python -m msld_sdk.cli``: the same as the ``msld`` command."""
import sys

from .main import main

sys.exit(main())
