"""``python -m attnscope.cli``: the same entry point as the ``attnscope`` command."""

from attnscope.cli import main

main()
