"""`scn-landmarks serve`: registered with the library's CLI through the `scn_landmarks.commands`
entry point, so the library itself never imports Slicer or trame."""

from __future__ import annotations

import argparse
import logging
import os


def register(commands) -> None:
    """Add the `serve` subcommand to the CLI's subparsers."""
    serve = commands.add_parser("serve", help="review landmarks in a web browser (trame-slicer)")
    serve.add_argument("image", nargs="?", help="an image to open at start")
    serve.add_argument("--model", help="catalogue model id or name, or a model file (default: first available)")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: this machine only; the app has no login)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    serve.add_argument("--idle-timeout", type=int, default=0,
                       help="stop after this many seconds without a connected page (0: never)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    # trame reads sys.argv unless TRAME_ARGS is set; our own arguments are passed explicitly below.
    os.environ["TRAME_ARGS"] = "--server"
    for chatty in ("trame", "trame_client", "trame_server", "trame_rca", "trame_slicer", "wslink", "aiohttp"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from .app import LandmarkReviewApp

    app = LandmarkReviewApp(image=args.image, model=args.model, device=args.device)
    app.server.controller.on_server_ready.add(lambda **_: print(
        f"SCN Landmarks review station: http://{args.host}:{app.server.port}/", flush=True))
    app.server.start(host=args.host, port=args.port, open_browser=False, timeout=args.idle_timeout,
                     show_connection_info=False)
    return 0
