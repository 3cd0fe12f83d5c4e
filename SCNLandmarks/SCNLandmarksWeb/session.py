"""One review session: a process with its own MRML scene, model and temporary folder.

Started by the front server (`launcher`) with ``python -m SCNLandmarksWeb.session`` before anyone
asks for it (a warm spare: the libraries imported and the model loaded); it listens on loopback on
a port of its own choosing, announces it on stdout, and answers only requests that carry its
session key (the front server adds it). It waits, however long, until the front server hands it to
a reviewer (``POST /claim``: who, and where their corrections are autosaved); from then on it ends
when its page has been closed for ``--idle-timeout`` seconds. It also ends when it is sent SIGTERM
or when the front server goes away (its stdin closes), and removes its temporary folder on the way
out.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from aiohttp import web

from . import access
from .launcher import CLAIM_PATH, ENDED_MESSAGE, READY_LINE, SESSION_KEY_ENVIRONMENT, SESSION_KEY_HEADER

WSLINK_SERVER = web.AppKey("wslink server", object)
QUIET_LOGGERS = ("trame", "trame_client", "trame_server", "trame_rca", "trame_slicer", "wslink", "aiohttp")


def parseArguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m SCNLandmarksWeb.session")
    parser.add_argument("--workdir", required=True, help="this session's temporary folder (removed at the end)")
    parser.add_argument("--image")
    parser.add_argument("--model")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--idle-timeout", type=int, default=300, help="counted once the session is claimed")
    parser.add_argument("--max-upload-mb", type=int, default=512)
    parser.add_argument("--training-folder", help="the station's training folder (default: one of this session's own)")
    parser.add_argument("--data-root", action="append", default=[], help="a folder the page may open files from")
    return parser.parse_args(argv)


def requireSessionKey(key: str):
    """aiohttp middleware: only the front server (which knows the key) may talk to this session."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if not access.matches(request.headers.get(SESSION_KEY_HEADER), key):
            return web.Response(status=403, text="not through the review station")
        return await handler(request)

    return middleware


def claimHandler(app, idleTimeout: int):
    """aiohttp handler of ``POST /claim``: the session is now the reviewer's (JSON: ``reviewer``, and
    ``autosave``, the folder their corrections not exported are kept in); its idle time starts."""

    async def claim(request: web.Request) -> web.Response:
        claimed = await request.json()
        with app.state:
            app.forReviewer(claimed["reviewer"], Path(claimed["autosave"]))
        # A spare waits unclaimed for as long as it takes (it starts with no idle timeout); from now
        # on the session ends `idleTimeout` seconds after its last page went (wslink's own timer).
        wslinkServer = request.app[WSLINK_SERVER]
        wslinkServer.config["timeout"] = idleTimeout
        wslinkServer.shutdown_schedule()
        return web.Response(text="claimed")

    return claim


def _endWhenFrontServerGoes() -> None:
    """The front server keeps our stdin open; when it closes, the front server is gone."""

    def watch() -> None:
        # os.read, not sys.stdin: a buffered reader's lock held by this thread would abort the exit.
        while os.read(sys.stdin.fileno(), 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="front-server-watch").start()


def main(argv: list[str] | None = None) -> int:
    arguments = parseArguments(argv)
    key = os.environ.pop(SESSION_KEY_ENVIRONMENT, "")
    if not key:
        print("a session is started by `scn-landmarks serve`, not by hand", file=sys.stderr)
        return 2
    workdir = Path(arguments.workdir)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # trame reads sys.argv unless TRAME_ARGS is set; the session's settings are passed explicitly below.
    os.environ["TRAME_ARGS"] = "--server"
    from .app import LandmarkReviewApp

    app = None
    try:
        app = LandmarkReviewApp(
            image=arguments.image,
            model=arguments.model,
            device=arguments.device,
            workdir=workdir,
            maxUploadBytes=arguments.max_upload_mb * 1024**2,
            trainingFolder=Path(arguments.training_folder) if arguments.training_folder else None,
            dataRoots=[Path(root) for root in arguments.data_root],
            endedMessage=ENDED_MESSAGE,
        )

        def bind(wslinkServer) -> None:
            wslinkServer.app.middlewares.append(requireSessionKey(key))
            wslinkServer.app[WSLINK_SERVER] = wslinkServer
            wslinkServer.app.router.add_post(CLAIM_PATH, claimHandler(app, arguments.idle_timeout))

        app.server.controller.on_server_bind.add(bind)
        app.server.controller.on_server_ready.add(lambda **_: print(f"{READY_LINE} {app.server.port}", flush=True))
        _endWhenFrontServerGoes()
        app.server.start(host="127.0.0.1", port=0, open_browser=False, timeout=0, show_connection_info=False)
    finally:
        if app is not None:
            app.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
