"""``python -m attnscope``: the same entry point as the ``attnscope`` command."""

from attnscope.entry import main

main()
