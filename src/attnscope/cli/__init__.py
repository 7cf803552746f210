"""The ``attnscope`` command line: a thin layer over the Python API.

``app`` (the commands), ``args`` (options derived from the settings dataclasses, argument checks),
``show`` (tables printed to the terminal).  :func:`main` is the console entry point.
"""


def main() -> None:
    """Console entry point (``attnscope``)."""
    from attnscope.cli.app import main as run  # lazy: start-up speed / clean Ctrl-C before torch is imported

    run()
