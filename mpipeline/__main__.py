"""``python -m mpipeline``: the same as the ``mpipeline`` command."""

from mpipeline.cli import main

raise SystemExit(main())
