"""`scn-landmarks serve`: registered with the library's CLI through the `scn_landmarks.commands`
entry point, so the library itself never imports Slicer or trame."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(commands) -> None:
    """Add the `serve` subcommand to the CLI's subparsers."""
    serve = commands.add_parser("serve", help="review landmarks in a web browser (trame-slicer)")
    serve.add_argument("image", nargs="?", help="an image every new session opens at start")
    serve.add_argument("--model", help="catalogue model id or name, or a model file (default: first available)")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only). Any other address needs an access token",
    )
    serve.add_argument(
        "--token",
        help="access token every browser must bring (`auto`: generate one and print the link); "
        "default the environment variable SCN_LANDMARKS_TOKEN",
    )
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    serve.add_argument(
        "--max-sessions",
        type=int,
        default=4,
        help="review sessions (browser tabs) at once, each its own process (default 4)",
    )
    serve.add_argument(
        "--warm-spares",
        type=int,
        default=1,
        help="sessions started ahead, so that a new reviewer's page is ready at once (default 1; 0: none)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=int,
        default=300,
        help="end a session this many seconds after its page was closed (default 300)",
    )
    serve.add_argument("--max-upload-mb", type=int, default=512, help="largest image upload (default 512 MB)")
    serve.add_argument(
        "--training-folder",
        help='where "Save as training pair" adds cases, shared by all sessions (default: each session '
        "its own, removed when it ends); fine-tuned models go to the user models folder "
        "($SCN_LANDMARKS_USER_MODELS), shared with the Slicer module",
    )
    serve.add_argument(
        "--data-root",
        action="append",
        metavar="DIR",
        help='a folder whose files the page\'s "or a file on the server" may open (repeatable; default: the '
        "folder of IMAGE, or none: then the page opens uploads and samples only)",
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from . import access
    from .launcher import LauncherOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        token = access.resolveToken(args.host, args.token)
    except access.AccessError as error:
        print(f"scn-landmarks serve: {error}", file=sys.stderr)
        return 2
    trainingFolder = None
    if args.training_folder:
        trainingFolder = Path(args.training_folder).expanduser().resolve()
        try:
            trainingFolder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(
                f"scn-landmarks serve: {trainingFolder}: cannot use it as the training folder ({error.strerror})",
                file=sys.stderr,
            )
            return 2
    folders = args.data_root or ([str(Path(args.image).parent)] if args.image else [])
    dataRoots = [Path(folder).expanduser().resolve() for folder in folders]
    for folder, root in zip(folders, dataRoots):
        if not root.is_dir():
            print(f"scn-landmarks serve: --data-root {folder}: not a folder", file=sys.stderr)
            return 2
    serve(
        LauncherOptions(
            host=args.host,
            port=args.port,
            token=token,
            maxSessions=max(1, args.max_sessions),
            warmSpares=max(0, args.warm_spares),
            idleTimeout=max(1, args.idle_timeout),
            maxUploadMegabytes=max(1, args.max_upload_mb),
            image=args.image,
            model=args.model,
            device=args.device,
            trainingFolder=str(trainingFolder) if trainingFolder else None,
            dataRoots=[str(root) for root in dataRoots],
        ),
        showToken=args.token == access.GENERATE,
    )
    return 0
