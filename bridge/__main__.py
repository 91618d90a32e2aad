"""``python -m hookwire`` is the ``hookwire`` command."""
import sys

from hookwire.cli import main

sys.exit(main())
