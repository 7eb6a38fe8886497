"""A Flask app served through a quick tunnel, in-process: no port, no cloudflared.

    .venv/bin/python bindings/python/examples/flask_app.py     # prints the public URL; Ctrl-C
"""
import json
import os
import signal

from flask import Flask, Response, request

import cfqt

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello from Flask, served in-process by cfqt\n"


@app.route("/count", methods=["POST"])
def count():
    total = 0
    while chunk := request.stream.read(65536):   # the upload streams in
        total += len(chunk)
    return f"received {total} bytes\n"


@app.route("/numbers")
def numbers():
    return Response((f"{i}\n" for i in range(100000)), mimetype="text/plain")   # streams out


# Tests point this at the offline edge emulator (cfqt-edge); unset: trycloudflare.com.
options = json.loads(os.environ.get("CFQT_OPTIONS", "{}"))
signals = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, signals)   # before the tunnel's threads start
with cfqt.serve_wsgi(app, **options) as tunnel:
    tunnel.wait_ready()
    print(tunnel.url, flush=True)
    signal.sigwait(signals)                         # Ctrl-C: graceful stop
