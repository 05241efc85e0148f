"""`GET|POST /unsubscribe/{token}`: the one-click unsubscribe endpoint (RFC 8058) and its page.

Mailbox providers POST `List-Unsubscribe=One-Click` to the URL of an email's
`List-Unsubscribe` header; that POST alone unsubscribes. A person who opens the
link gets a page with a button that makes the same POST: a GET never
unsubscribes, since link scanners and prefetchers follow every link. Pages hold
nothing about the recipient (we know nothing about them) and nothing from the
request.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from libs.logs import LogThrottle
from libs.store import STORE_ERRORS
from services.receipts.opt_outs import OptOuts, UnsubscribeOutcome

log = logging.getLogger(__name__)

OPT_OUTS: web.AppKey[OptOuts] = web.AppKey("opt_outs", OptOuts)
UNSUBSCRIBE_PATH = "/unsubscribe/"
MAX_POST_BYTES = 1024
READ_TIMEOUT_SECONDS = 5.0
# When a store outage's 503 tells a mailbox provider or a person to try again.
RETRY_AFTER_SECONDS = 5
# Anyone can post a body that does not decode, and whoever holds a link can open or post it at will, the
# store away or not: such a line once a minute per kind, saying how many more came since.
REPEATED_LOG_SECONDS = 60.0
REPEATED_LOGS: web.AppKey[LogThrottle] = web.AppKey("unsubscribe_repeated_logs", LogThrottle)

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it: no button under another page
    "X-Content-Type-Options": "nosniff",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title></head>
<body><main><h1>{title}</h1><p>{text}</p>{form}</main></body></html>
"""
# Relative to /unsubscribe/{token}, so it works behind any public base URL.
_FORM = """<form method="post" action="{token}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>"""


def page(status: int, title: str, text: str, form: str = "") -> web.Response:
    body = _PAGE.format(title=title, text=text, form=form)
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=_HEADERS)


def store_unavailable(text: str) -> web.Response:
    """503 saying when to try again: nothing was written, and the page must not say otherwise."""
    reply = page(503, "Try again later", text)
    reply.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return reply


def _token(request: web.Request) -> str:
    token = request.match_info["token"]
    # Our tokens are urlsafe base64; anything else is not worth a lookup (nor safe to echo into the form).
    return token if token and len(token) <= 512 and token.replace("-", "").replace("_", "").isalnum() else ""


def _log_store_unavailable(request: web.Request, where: str, exc: BaseException) -> None:
    """Whoever holds a link can repeat it while the store is away: a line a minute per place and kind."""
    kind = type(exc).__name__
    request.app[REPEATED_LOGS].log((where, kind), log, logging.WARNING, "%s: store unavailable (%s)", where, kind)


async def show(request: web.Request) -> web.Response:
    token = _token(request)
    try:
        refused = await request.app[OPT_OUTS].check(token) if token else UnsubscribeOutcome(done=False)
    except (*STORE_ERRORS, TimeoutError) as exc:
        _log_store_unavailable(request, "unsubscribe page", exc)
        return store_unavailable("We could not check this link just now. Please try again.")
    if refused is not None:
        return _not_done(refused)
    return page(
        200,
        "Unsubscribe",
        "Press the button to stop these emails. Nothing happens until you do.",
        _FORM.format(token=token),
    )


async def unsubscribe(request: web.Request) -> web.Response:
    token = _token(request)
    if not token:
        return page(404, "Link not recognised", "This unsubscribe link is not valid.")
    try:
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):  # the client's part only: a slow store is not its fault
            # The body (List-Unsubscribe=One-Click) carries nothing we need; read a little and drop it.
            await request.content.read(MAX_POST_BYTES)
    except TimeoutError:
        return page(408, "Try again", "The request took too long.")
    except ConnectionError:  # the client hung up mid-body: nobody is left to answer
        log.debug("unsubscribe: client went away before sending its whole body")
        return page(400, "Try again", "The request was cut off.")
    except web.RequestPayloadError:  # a Content-Encoding that does not decode: the client's fault
        request.app[REPEATED_LOGS].log("undecodable", log, logging.INFO, "unsubscribe: body could not be decoded")
        request.content.feed_eof()  # nothing more to read: else aiohttp reads on and logs the error
        reply = page(400, "Try again", "The request could not be read.")
        reply.force_close()
        return reply
    try:
        outcome = await request.app[OPT_OUTS].unsubscribe(token)
    except (*STORE_ERRORS, TimeoutError) as exc:
        _log_store_unavailable(request, "unsubscribe", exc)
        return store_unavailable("We could not record your request just now. Please try again.")
    if outcome.done:
        return page(200, "You are unsubscribed", "You will not receive these messages any more.")
    return _not_done(outcome)


def _not_done(outcome: UnsubscribeOutcome) -> web.Response:
    if outcome.expired:
        return page(410, "Link expired", "This unsubscribe link has expired. Use the link in a recent message.")
    return page(404, "Link not recognised", "This unsubscribe link is not valid.")


def add_routes(app: web.Application, opt_outs: OptOuts) -> None:
    app[OPT_OUTS] = opt_outs
    app[REPEATED_LOGS] = LogThrottle(REPEATED_LOG_SECONDS)
    app.router.add_get(UNSUBSCRIBE_PATH + "{token}", show)
    app.router.add_post(UNSUBSCRIBE_PATH + "{token}", unsubscribe)
