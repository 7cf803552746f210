"""`attnscope serve` on the command line: bad inputs are one line on stderr with exit status 2, and a real
start prints the URL, answers on 127.0.0.1 and stops on Ctrl+C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")


def _busy_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir(exist_ok=True)
    return str(tmp_path / "empty")


CASES = [  # (arguments after `serve`, start of the error line)
    (lambda t, p: ["demo", "--port", "70000"], "error: --port 70000 is out of range"),
    (lambda t, p: ["demo", "--port", "0"], "error: --port 0 is out of range"),
    (lambda t, p: ["demo", "--port", str(p)], "error: cannot listen on 127.0.0.1:{port}"),
    (lambda t, p: ["demo", "--host", "192.0.2.1"], "error: cannot listen on 192.0.2.1:8000"),
    (lambda t, p: ["demo", "--analysis", str(t / "nowhere")], "error: --analysis {tmp}/nowhere is not a folder"),
    (lambda t, p: ["demo", "--analysis", _empty_dir(t)], "error: no circuit or neurons.json in"),
    (lambda t, p: ["./missing-model-folder"], "error: no such file or folder"),
]


@pytest.mark.parametrize("args,start", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_inputs_are_one_line(args, start, tmp_path, demo, monkeypatch, capsys):
    """The console entry point in-process (the same `main()` the `attnscope` command runs)."""
    from attnscope.cli.app import main

    busy = _busy_port()
    port = busy.getsockname()[1]
    monkeypatch.setattr(sys, "argv", ["attnscope", "serve", *args(tmp_path, port)])
    try:
        with pytest.raises(SystemExit) as ex:
            main()
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert ex.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start.format(port=port, tmp=tmp_path)), err
    assert "Traceback" not in err


def test_serve_starts_on_localhost_and_stops(demo):
    from attnscope.serve import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "attnscope.cli.app", "serve", "demo", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        t0 = time.monotonic()
        while url is None and time.monotonic() - t0 < 300:  # start-up runs find_neurons
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                pytest.fail(f"serve exited: {p.stderr.read()}")
            if line.startswith("attnscope serve: http://"):
                url = line.split()[2]
                assert "press Ctrl+C to stop" in line
        assert url == f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                info = json.load(urllib.request.urlopen(url + "api/info", timeout=5))
                break
            except OSError:
                time.sleep(0.1)
        assert info["model"]["name"] == "demo" and info["circuit"]["heads"]
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert "Traceback" not in err
