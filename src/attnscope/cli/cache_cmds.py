"""``attnscope cache info`` and ``attnscope cache clear``: the on-disk cache (:mod:`attnscope.core.cache`)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from attnscope.cli.args import JsonOpt
from attnscope.cli.show import emit, print_table
from attnscope.core.cache import KINDS, cache_clear, cache_dir, cache_info, clear_plan
from attnscope.core.errors import AttnscopeError

cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Show or clear the on-disk cache ($ATTNSCOPE_CACHE, default ~/.cache/attnscope).")


@cache_app.command("info")
def cache_info_cmd(as_json: JsonOpt = False) -> None:
    """Where the cache is, and entries and size of each part (kernels, tokens, gguf, filehash, evolution)."""
    d = cache_info()
    emit(d, as_json, lambda d: print_table(
        {"path ($ATTNSCOPE_CACHE)": d["path"], "marked as attnscope's": "yes" if d["marked"] else "no",
         **{k: f"{v['entries']} entries, {v['bytes'] / 1e6:.1f} MB" for k, v in d["kinds"].items()},
         "total": f"{d['total_bytes'] / 1e6:.1f} MB", "files attnscope did not write (kept)": d["not_attnscope"]},
        "attnscope cache"))


@cache_app.command("clear")
def cache_clear_cmd(
    kinds: Annotated[Optional[list[str]], typer.Argument(
        metavar="[PART]...", show_default=False,
        help="kernels, tokens, gguf, filehash or evolution [default: all]")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation (needed when stdin is not a "
                                      "terminal)")] = False,
) -> None:
    """Remove attnscope's cache entries (or those of the named parts); they are recomputed when next needed.

    Only a folder marked as attnscope's cache (CACHEDIR.TAG) is cleared, and only entries in the form
    attnscope writes; other files are kept. Asks for confirmation unless --yes is given."""
    bad = [k for k in kinds or [] if k not in KINDS]
    if bad:
        raise AttnscopeError(f"no cache part {bad[0]!r}; the parts are {', '.join(KINDS)}")
    entries, size = clear_plan(kinds)
    if not entries:
        typer.echo(f"nothing to clear in {cache_dir()}")
        return
    what = f"{len(entries)} cache entries ({size / 1e6:.1f} MB) from {cache_dir()}"
    if not yes:
        if not stdin_is_terminal():
            raise AttnscopeError(f"cache clear would remove {what} and asks for confirmation, but stdin is not a "
                                 "terminal; pass --yes")
        if not typer.confirm(f"remove {what}?", default=False):
            typer.echo("nothing removed")
            raise typer.Exit(1)
    typer.echo(f"freed {cache_clear(kinds) / 1e6:.1f} MB in {cache_dir()}")


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
