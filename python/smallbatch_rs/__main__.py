"""``python -m smallbatch_rs``: the ``smallbatch-rs`` command."""

from .cli import main

raise SystemExit(main())
