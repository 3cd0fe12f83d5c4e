"""One review session per browser tab, each in its own process (trame's launcher model).

`scn-landmarks serve` runs this small front server. Opening ``/`` hands the browser a session
process (`SCNLandmarksWeb.session`: its own MRML scene, model and temporary folder) and sends it to
``/s/<session id>/``; the front server passes that page's requests and websocket to the session's
process, which listens on loopback only and accepts only the front server (a per-session key).
Starting a session takes seconds (Python, torch, Slicer's libraries, the model), so the station
keeps `warmSpares` of them started ahead, unclaimed: opening ``/`` takes one, and starts the next.
Reloading the page keeps the session; a session whose page has been closed for `idleTimeout`
seconds ends, and its temporary folder is removed. At most `maxSessions` processes run at once
(spares included); one more reviewer gets a page saying so. Every request needs the access token
when one is set (see `access`).

Each browser gets a reviewer id (a cookie). A session writes its corrections not exported yet to
an autosave folder of that reviewer, outside its temporary folder, so a session that ended (its
page closed too long, or the tab closed by mistake) leaves them to the reviewer's next session,
which offers them back; the autosaves last as long as the station runs.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from wslink.chunking import MESSAGE_SIZE_LENGTH, MESSAGE_SIZE_LOCATION
from wslink.protocol import MAX_MSG_SIZE as WSLINK_CHUNK_BYTES

from . import access

logger = logging.getLogger(__name__)

SESSION_KEY_HEADER = "X-SCN-Landmarks-Session-Key"
SESSION_KEY_ENVIRONMENT = "SCN_LANDMARKS_SESSION_KEY"
CLAIM_PATH = "/claim"  # where a session is handed to its reviewer (see `session`)
REVIEWER_COOKIE = "scn_landmarks_reviewer"
REVIEWER_COOKIE_MAX_AGE_S = 365 * 24 * 3600
AUTOSAVE_FOLDER = "autosave"
READY_LINE = "SCN Landmarks session ready on port"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 10
# Response headers of a session's static files that travel back to the browser.
PASSED_HEADERS = ("Content-Type", "Cache-Control", "Last-Modified", "ETag", "Content-Encoding")
# An upload travels as one wslink message: the file plus its name, type and the call around it.
UPLOAD_ENVELOPE_BYTES = 1024**2


def announcedSize(frame: bytes) -> int:
    """The size of the whole wslink message a browser frame belongs to, from the frame's chunk header
    (wslink splits every message into frames of at most WSLINK_CHUNK_BYTES, each headed by the
    message's id, the frame's offset and the message's total size)."""
    return int.from_bytes(frame[MESSAGE_SIZE_LOCATION : MESSAGE_SIZE_LOCATION + MESSAGE_SIZE_LENGTH], "little")


@dataclass
class LauncherOptions:
    """What `scn-landmarks serve` was asked for."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    maxSessions: int = 4
    warmSpares: int = 1  # sessions started ahead, so that a reviewer's comes at once
    idleTimeout: int = 300
    maxUploadMegabytes: int = 512
    image: str | None = None
    model: str | None = None
    device: str = "auto"
    trainingFolder: str | None = None
    dataRoots: list[str] = field(default_factory=list)  # folders the page may open files from


@dataclass
class Session:
    """A running session process.

    Attributes:
        reviewer: whose it is; None while it is a spare.
        ready: True once the process listens, False if it ended before.
        claimed: the hand-over to the reviewer (`_handOver`, a task: True once the process is
            theirs, False if that failed); None while it is a spare.
    """

    id: str
    workdir: Path
    key: str
    reviewer: str | None = None
    process: asyncio.subprocess.Process | None = None
    port: int | None = None
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    claimed: asyncio.Task | None = None


# What happened to a session that is gone, and to its work (also shown by a page whose session ends under it).
ENDED_MESSAGE = (
    "Sessions end a few minutes after their page is closed, and when the station stops. Corrections "
    "that were not exported are kept while the station runs: a new session in this browser offers them "
    "back. A station that was stopped or restarted has kept none. "
    '<a href="/">Open a new session</a>.'
)


def page(title: str, message: str, status: int, refresh_s: int | None = None) -> web.Response:
    """A small self-contained HTML page (the trame page cannot be shown without a session)."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    body = (
        f'<!doctype html><html><head><meta charset="utf-8">{refresh}<title>SCN Landmarks: {html.escape(title)}'
        '</title></head><body style="font-family: sans-serif; margin: 3em; max-width: 40em;">'
        f'<h2 id="title">{html.escape(title)}</h2><p id="message">{message}</p></body></html>'
    )
    return web.Response(text=body, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


class ReviewLauncher:
    """The front server: access control, session processes and the passage to them."""

    def __init__(self, options: LauncherOptions):
        self.options = options
        self.sessions: dict[str, Session] = {}
        self.root = Path(tempfile.mkdtemp(prefix="scn-landmarks-web-"))
        self.client: aiohttp.ClientSession | None = None
        self.stopping = False

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._requireAccess], client_max_size=1024**2)
        app.router.add_get("/", self._newSession)
        app.router.add_get("/s/{id}", self._addSlash)
        app.router.add_get("/s/{id}/{tail:.*}", self._sessionRequest)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    # ------------------------------------------------------------------------------------------
    # access

    @web.middleware
    async def _requireAccess(self, request: web.Request, handler) -> web.StreamResponse:
        token = self.options.token
        if token is None:
            return await handler(request)
        cookie = access.cookieValue(token)
        if access.matches(request.query.get(access.QUERY), token):
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await handler(request)
            # Keep the token out of the address bar and the history from here on.
            query = {k: v for k, v in request.query.items() if k != access.QUERY}
            response = web.HTTPSeeOther(request.rel_url.with_query(query))
            response.set_cookie(access.COOKIE, cookie, httponly=True, samesite="Strict", path="/")
            return response
        if access.matches(request.cookies.get(access.COOKIE), cookie):
            return await handler(request)
        logger.warning("refused %s %s from %s: no valid access token", request.method, request.path, request.remote)
        return page(
            "Access token needed",
            "This review station is protected: open it with the link (ending in <code>?token=...</code>) "
            "printed when it was started, or ask whoever started it.",
            401,
        )

    # ------------------------------------------------------------------------------------------
    # sessions

    async def _newSession(self, request: web.Request) -> web.StreamResponse:
        self._forgetEnded()
        if sum(session.reviewer is not None for session in self.sessions.values()) >= self.options.maxSessions:
            return page(
                "All review sessions are in use",
                f"This station runs at most {self.options.maxSessions} review sessions at once, and all are "
                "open. A session ends a few minutes after its page is closed; try again then "
                '(<a href="/">retry</a>).',
                503,
            )
        reviewer = request.cookies.get(REVIEWER_COOKIE, "")
        if not re.fullmatch(r"[\w-]{16,64}", reviewer):  # it names a folder: only ids of ours
            reviewer = secrets.token_urlsafe(16)
        spares = [session for session in self.sessions.values() if session.reviewer is None]
        # The spare that has been starting longest (the first started) is the nearest to ready.
        session = spares[0] if spares else self._start()
        session.reviewer = reviewer
        session.claimed = asyncio.get_running_loop().create_task(self._handOver(session))
        self._keepSpares()
        response = web.HTTPSeeOther(f"/s/{session.id}/")
        response.set_cookie(
            REVIEWER_COOKIE, reviewer, httponly=True, samesite="Strict", path="/", max_age=REVIEWER_COOKIE_MAX_AGE_S
        )
        raise response

    def _start(self) -> Session:
        """Start a session process, a spare until it is handed over."""
        sessionId = secrets.token_urlsafe(16)
        session = Session(sessionId, self.root / sessionId, secrets.token_urlsafe(32))
        session.workdir.mkdir()
        self.sessions[sessionId] = session
        asyncio.get_running_loop().create_task(self._run(session))
        return session

    def _keepSpares(self) -> None:
        """Start spares up to `warmSpares`, as far as `maxSessions` leaves room."""
        if self.stopping:
            return
        spares = sum(session.reviewer is None for session in self.sessions.values())
        for _ in range(min(self.options.warmSpares - spares, self.options.maxSessions - len(self.sessions))):
            self._start()

    async def _handOver(self, session: Session) -> bool:
        """Give the session to its reviewer once it is ready; True when it took them."""
        if not await session.ready:
            return False
        autosave = self.root / AUTOSAVE_FOLDER / session.reviewer / session.id
        try:
            async with self.client.post(
                f"http://127.0.0.1:{session.port}{CLAIM_PATH}",
                json={"reviewer": session.reviewer, "autosave": str(autosave)},
                headers={SESSION_KEY_HEADER: session.key},
            ) as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            logger.exception("session %s could not be handed over", session.id[:6])
            return False

    async def _run(self, session: Session) -> None:
        """Start a session process, follow its output, and clean up after it ends."""
        options = self.options
        command = [
            sys.executable,
            "-m",
            "SCNLandmarksWeb.session",
            "--workdir",
            str(session.workdir),
            "--device",
            options.device,
            "--idle-timeout",
            str(options.idleTimeout),
            "--max-upload-mb",
            str(options.maxUploadMegabytes),
        ]
        if options.model:
            command += ["--model", options.model]
        if options.image:
            command += ["--image", options.image]
        if options.trainingFolder:
            command += ["--training-folder", options.trainingFolder]
        for root in options.dataRoots:
            command += ["--data-root", root]
        environment = {**os.environ, SESSION_KEY_ENVIRONMENT: session.key}
        environment.pop(access.TOKEN_ENVIRONMENT, None)
        try:
            # stdin stays open: a session process whose front server has gone sees it close and ends.
            session.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=environment,
            )
            logger.info("session %s started (process %d)", session.id[:6], session.process.pid)
            async for raw in session.process.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if line.startswith(READY_LINE) and not session.ready.done():
                    session.port = int(line.split()[-1])
                    session.ready.set_result(True)
                    logger.info("session %s ready%s", session.id[:6], "" if session.reviewer else " (a spare)")
                elif line:
                    logger.info("[session %s] %s", session.id[:6], line)
            await session.process.wait()
            logger.info("session %s ended (exit status %s)", session.id[:6], session.process.returncode)
        except Exception:  # the session is gone; the front server and the other sessions carry on
            logger.exception("session %s failed", session.id[:6])
        finally:
            if not session.ready.done():
                session.ready.set_result(False)
            self.sessions.pop(session.id, None)
            shutil.rmtree(session.workdir, ignore_errors=True)
            if session.reviewer is not None:  # (a spare that failed is not restarted over and over)
                self._keepSpares()

    def _forgetEnded(self) -> None:
        for sessionId, session in list(self.sessions.items()):
            if session.process is not None and session.process.returncode is not None:
                self.sessions.pop(sessionId, None)

    async def _addSlash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(f"/s/{request.match_info['id']}/")

    async def _sessionRequest(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.match_info["id"])
        if session is None or session.claimed is None:  # (a spare's id is never given out)
            return self._ended()
        tail = request.match_info["tail"]
        if not session.claimed.done() and tail == "":
            return page(
                "Starting your review session", "One moment: the review station is starting...", 200, refresh_s=1
            )
        try:
            started = await asyncio.wait_for(asyncio.shield(session.claimed), START_TIMEOUT_S)
        except TimeoutError:
            started = False
        if not started:
            return page(
                "The review session could not start",
                'The details are in the server\'s log. <a href="/">Try a new session</a>.',
                500,
            )
        try:
            if tail == "ws":
                return await self._passWebsocket(request, session)
            return await self._passRequest(request, session, tail)
        except aiohttp.ClientConnectionError:  # the session process is ending right now
            return self._ended()

    @staticmethod
    def _ended() -> web.Response:
        return page("This review session has ended", ENDED_MESSAGE, 404)

    # ------------------------------------------------------------------------------------------
    # passage to a session

    async def _passRequest(self, request: web.Request, session: Session, tail: str) -> web.StreamResponse:
        url = f"http://127.0.0.1:{session.port}/{tail}"
        async with self.client.get(url, params=request.query, headers={SESSION_KEY_HEADER: session.key}) as upstream:
            body = await upstream.read()
            headers = {name: upstream.headers[name] for name in PASSED_HEADERS if name in upstream.headers}
            if tail in ("", "index.html"):
                # The page of a session must come from the station each time: a copy from the browser's
                # cache, opened after the session ended, has nothing to connect to (a blank page).
                headers["Cache-Control"] = "no-store"
                headers.pop("Last-Modified", None)
                headers.pop("ETag", None)
            return web.Response(body=body, status=upstream.status, headers=headers)

    async def _passWebsocket(self, request: web.Request, session: Session) -> web.StreamResponse:
        # A page of another site must not drive a session with this browser's cookie.
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            logger.warning("refused a websocket from origin %s", origin)
            return web.Response(status=403, text="cross-site websocket refused")
        url = f"http://127.0.0.1:{session.port}/ws"
        limit = self.options.maxUploadMegabytes * 1024**2 + UPLOAD_ENVELOPE_BYTES
        async with self.client.ws_connect(url, headers={SESSION_KEY_HEADER: session.key}, max_msg_size=0) as server:
            # A browser frame larger than a wslink chunk is refused from its header, before its bytes come.
            browser = web.WebSocketResponse(max_msg_size=WSLINK_CHUNK_BYTES)
            await browser.prepare(request)

            async def forward(source, target, fromBrowser: bool) -> None:
                async for message in source:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        # The page checks an upload's size before sending it; this is the hard cap, applied
                        # at a message's first frame, which announces the whole message's size.
                        if fromBrowser and announcedSize(message.data) > limit:
                            logger.warning(
                                "session %s: refused a %d-byte message (uploads are limited to %d MB); "
                                "connection closed",
                                session.id[:6],
                                announcedSize(message.data),
                                self.options.maxUploadMegabytes,
                            )
                            await browser.close(code=aiohttp.WSCloseCode.MESSAGE_TOO_BIG, message=b"upload too large")
                            break
                        await target.send_bytes(message.data)
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        await target.send_str(message.data)
                    else:
                        break

            tasks = [
                asyncio.ensure_future(forward(browser, server, True)),
                asyncio.ensure_future(forward(server, browser, False)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
        await browser.close()
        return browser

    # ------------------------------------------------------------------------------------------
    # life cycle

    async def _startup(self, app: web.Application) -> None:
        self.client = aiohttp.ClientSession(auto_decompress=False)
        self._keepSpares()

    async def _cleanup(self, app: web.Application) -> None:
        """End every session process and remove all temporary folders."""
        self.stopping = True
        processes = [s.process for s in self.sessions.values() if s.process and s.process.returncode is None]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
        if self.client is not None:
            await self.client.close()
        shutil.rmtree(self.root, ignore_errors=True)


def reachableAddress() -> str:
    """This machine's address on its default route, as other machines reach it (its name often maps
    to localhost, which on another machine is that machine)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a documentation address; connecting a UDP socket sends nothing
            address = probe.getsockname()[0]
    except OSError:  # no route: no network to be reached from either
        address = ""
    return address if address and not access.isLoopback(address) else socket.gethostname()


def startUrl(options: LauncherOptions, port: int, showToken: bool) -> str:
    """The address to open (with the token when it was generated: printed once, ready to open)."""
    host = options.host
    if host in ("0.0.0.0", "::", ""):
        host = reachableAddress()
    host = f"[{host}]" if ":" in host else host
    query = f"?{access.QUERY}={options.token}" if showToken and options.token else ""
    return f"http://{host}:{port}/{query}"


def serve(options: LauncherOptions, showToken: bool = False) -> None:
    """Run the front server until it is stopped (Ctrl-C or SIGTERM); then end every session."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signalNumber in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signalNumber, stop.set)
        runner = web.AppRunner(ReviewLauncher(options).application(), handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, options.host, options.port).start()
            port = runner.addresses[0][1]  # with --port 0 the system picked it
            print(f"SCN Landmarks review station: {startUrl(options, port, showToken)}", flush=True)
            if options.token and not showToken:
                print(f"Open it with ?{access.QUERY}=<the access token> added to the address.", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
