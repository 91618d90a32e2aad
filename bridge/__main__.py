"""``python -m hookwire`` is the ``hookwire`` command (``hookwire.server.cli``). The one
listed exception to the dependency rule (tests/test_dependency_rule.py): this module is run,
never imported, so no module of the core depends on the server through it."""
import sys

from hookwire.server.cli import main

sys.exit(main())
