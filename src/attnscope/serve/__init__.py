r"""``attnscope serve``: a local page where anyone tests a neuron's explanation on their own text.

For the chosen layer-0 neuron and a typed, pasted or uploaded text the page shows, per token, the true
pre-activation (the model's own forward pass, :func:`attnscope.exact.forward.iter_layers`) beside the
explanation's prediction (:mod:`.explanation`), the evidence behind the prediction at any position, and
whether this input satisfies each condition the explanation states (:mod:`.scope`).  The model, circuit
and neuron table are computed once (:mod:`.state`); the page and API live in :mod:`.app`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from attnscope.core.errors import AttnscopeError
from attnscope.models import ModelWeights
from attnscope.serve.limits import HostPolicy, check_allow_host

__all__ = ["background_server", "check_port", "create_app", "free_port", "load_serve_model", "run_server",
           "serve_command"]


def __getattr__(name: str):  # FastAPI is imported only when the server is used
    if name == "create_app":
        from attnscope.serve.app import create_app

        return create_app
    if name == "load_serve_model":
        from attnscope.serve.state import load_serve_model

        return load_serve_model
    raise AttributeError(name)


def check_port(host: str, port: int) -> None:
    """One-line errors for a port outside 1..65535 or already in use (before loading anything heavy)."""
    if not 1 <= port <= 65535:
        raise AttnscopeError(f"--port {port} is out of range; pass a port between 1 and 65535 (default 8000)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise AttnscopeError(f"--host {host!r} is not an address of this machine; the default is 127.0.0.1") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as err:
            raise AttnscopeError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                                 "pass another --port") from None


def serve_command(load_model_fn, analysis: Path | None, host: str, port: int, log=print,
                  allow_hosts: tuple[str, ...] | list[str] = ()) -> None:
    """`attnscope serve`: check the port, the ``--allow-host`` names and the analysis folder first (one-line
    errors before the model loads), then load the model (``load_model_fn()``) and serve."""
    check_port(host, port)
    allow = tuple(check_allow_host(h) for h in allow_hosts)
    if analysis is not None and not Path(analysis).is_dir():
        raise AttnscopeError(f"--analysis {analysis} is not a folder; pass the output folder of `attnscope report` "
                             "or `attnscope neurons`")
    run_server(load_model_fn(), analysis=analysis, host=host, port=port, log=log, allow_hosts=allow)


def run_server(w: ModelWeights, *, analysis: Path | None = None, host: str = "127.0.0.1", port: int = 8000,
               log=print, allow_hosts: tuple[str, ...] = ()) -> None:
    """Load everything once, then serve until Ctrl+C."""
    import uvicorn

    from attnscope.serve.app import create_app
    from attnscope.serve.state import load_serve_model

    check_port(host, port)
    m = load_serve_model(w, analysis, log=log)
    shown = f"[{host}]" if ":" in host else host
    log(f"attnscope serve: http://{shown}:{port}/  (model {w.name}; press Ctrl+C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}: anyone who can reach this machine can use the page; it answers the Host "
            f"names {HostPolicy(host, allow_hosts).describe()} (add more with --allow-host NAME)")
    uvicorn.run(create_app(m, host=host, allow_hosts=allow_hosts), host=host, port=port, log_level="warning")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` from a thread (tests, notebooks, the screenshot script); yields its base URL."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout_s:
            raise AttnscopeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
