"""reid-serve over HTTP: the aiohttp application (routes, limits, errors), the search page
(`ui/`, served at `/`) and the listener with its connection cap."""

import asyncio
import json
import os
import sys
import time

from reid_tf.deploy.gallery.store import GalleryUnavailable
from reid_tf.deploy.serving.requests import BadRequest
from reid_tf.deploy.serving.requests import BodyTimeout
from reid_tf.deploy.serving.requests import Overloaded
from reid_tf.deploy.serving.requests import RequestTooLarge


DEFAULT_MAX_CONNECTIONS = 256
VERBS = ("predict", "search", "verify", "add", "remove")
UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
            "placeholder.svg": "image/svg+xml"}


def make_app(server, max_body_bytes=32 << 20, timeout_s=30.0, ui=True):
    """The aiohttp application of `server` (`ui`: the search page at `/`)."""
    from aiohttp import web

    def error(status, message, field=None):
        return web.json_response({"error": message, "field": field}, status=status)

    async def read_json(request, deadline):
        loop = asyncio.get_running_loop()
        try:  # a body that trickles in, or stalls, is cut off at the request's time limit
            data = await asyncio.wait_for(request.read(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise BodyTimeout() from None
        try:  # parsed on the server's parsing pool: a 30 MB body never holds the event loop
            return await loop.run_in_executor(server.pool, json.loads, data)
        except (UnicodeDecodeError, json.JSONDecodeError) as problem:
            raise BadRequest("body", f"malformed JSON: {problem}") from None
        except RecursionError:
            raise BadRequest("body", "JSON nested too deeply.") from None

    def check_model(request):
        name = request.match_info["name"]
        if request.method != "POST" and ":" in name and name.split(":")[-1] in VERBS:
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])  # GET on :predict & co
        if name != server.model_name:
            raise web.HTTPNotFound(text=json.dumps(
                {"error": f"Servable not found for request: Latest({name})", "field": "name"}),
                content_type="application/json")
        version = request.match_info.get("version")
        if version is not None and version != str(server.export.version):
            raise web.HTTPNotFound(text=json.dumps(
                {"error": f"version {version} not found; serving {server.export.version}",
                 "field": "version"}), content_type="application/json")

    @web.middleware
    async def metrics(request, handler):
        start = time.perf_counter()
        # Labels never come from the client: a made-up verb is counted as "unknown".
        verb = request.match_info.get("method")
        route = (verb if verb in VERBS else "unknown") if verb is not None else ROUTES.get(
            request.match_info.handler, "unknown")
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as problem:
            status = problem.status
            raise
        finally:
            server.metrics.requests.labels(route, str(status)).inc()
            server.metrics.latency.labels(route).observe(time.perf_counter() - start)

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except BadRequest as problem:
            return error(400, problem.message, problem.field)
        except Overloaded:
            response = error(503, "the model's queue is full; retry shortly", None)
            response.headers["Retry-After"] = "1"
            return response
        except RequestTooLarge as problem:
            return error(413, str(problem), "instances")
        except GalleryUnavailable as problem:
            response = error(503, str(problem), "gallery")
            response.headers["Retry-After"] = "1"
            return response
        except BodyTimeout:
            response = error(408, f"request body not received within {timeout_s} s", "body")
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"body over {max_body_bytes} bytes", "body")
        except asyncio.TimeoutError:
            message = f"request took over {timeout_s} s"
            if request.match_info.get("method") in ("add", "remove"):
                # The gallery call keeps running in its thread and may still commit.
                message += ("; the change may still have been committed: retrying it is safe "
                            "(an :add replaces by id, a :remove of a removed id is a no-op)")
            return error(504, message, None)
        except web.HTTPException as problem:
            if problem.content_type == "application/json":
                raise
            return error(problem.status, f"{request.method} {request.path}: {problem.reason}",
                         None)  # unknown routes and methods answer JSON too
        except Exception as problem:  # never let a request take the server down
            print(f"reid-serve: internal error: {problem!r}", file=sys.stderr, flush=True)
            return error(500, "internal error", None)

    async def status(request):
        check_model(request)
        return web.json_response(server.status())

    async def metadata(request):
        check_model(request)
        return web.json_response(server.metadata())

    async def post(request):
        check_model(request)
        method = request.match_info["method"]
        if method not in VERBS:
            raise BadRequest("method", f":{method}; expected :predict, :search, :verify, :add "
                             "or :remove.")
        deadline = asyncio.get_running_loop().time() + timeout_s
        body = await read_json(request, deadline)
        result = await asyncio.wait_for(server.answer(method, body),
                                        max(deadline - asyncio.get_running_loop().time(), 0.001))
        data = await asyncio.get_running_loop().run_in_executor(server.pool, _dumps, result)
        return web.Response(body=data, content_type="application/json")

    async def gallery_read(request, read, *arguments):
        check_model(request)
        loop = asyncio.get_running_loop()  # the store's lock may be held: never on the loop
        return await asyncio.wait_for(loop.run_in_executor(server.gallery_pool, read,
                                                           *arguments), timeout_s)

    async def gallery(request):
        return web.json_response(await gallery_read(request, server.gallery_stats),
                                 dumps=_text_dumps)

    async def entries(request):
        return web.json_response(await gallery_read(request, server.gallery_entries,
                                                    dict(request.query)), dumps=_text_dumps)

    async def thumbnail(request):
        entry_id = request.match_info["entry_id"]
        data = await gallery_read(request, server.thumbnail, entry_id)
        if data is None:
            return error(404, f"entry {entry_id!r} has no thumbnail (absent, or added as an "
                         "embedding)", "entry_id")
        return web.Response(body=data, content_type="image/jpeg",
                            headers={"Cache-Control": "no-cache"})

    async def page(request):
        name = request.match_info.get("file", "index.html")
        if name == "config.json":  # what the page needs to address the API
            return web.json_response({"model_name": server.model_name,
                                      "version": str(server.export.version),
                                      "gallery": server.gallery is not None})
        if name not in UI_FILES:
            raise web.HTTPNotFound()
        with open(os.path.join(UI_DIR, name), "rb") as f:
            body = f.read()
        return web.Response(body=body, content_type=UI_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    async def exposition(request):
        body, content_type = server.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(app):
        server.batcher.start()

    async def stop(app):
        await server.batcher.stop()
        if server.gallery is not None:
            server.gallery.close()  # writes the index file

    ROUTES = {}  # handler -> the route label of the metrics
    app = web.Application(client_max_size=max_body_bytes, middlewares=[metrics, errors])
    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
        app.router.add_get(prefix, status)
        app.router.add_get(prefix + "/metadata", metadata)
        app.router.add_post(prefix + ":{method}", post)
        app.router.add_get(prefix + "/gallery", gallery)
        app.router.add_get(prefix + "/gallery/entries", entries)
        app.router.add_get(prefix + "/gallery/thumbnails/{entry_id:.+}", thumbnail)
    app.router.add_get("/metrics", exposition)
    if ui:
        app.router.add_get("/", page)
        app.router.add_get("/ui/{file}", page)
    ROUTES.update({status: "status", metadata: "metadata", exposition: "metrics",
                   gallery: "gallery", entries: "entries", thumbnail: "thumbnail", page: "ui"})
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def _json_error_handler():
    """aiohttp's connection handler, answering the errors of its own HTTP parser (a bad
    Content-Length, an oversize URL or header) in reid-serve's JSON shape, not text/plain."""
    from aiohttp import web
    from aiohttp import web_protocol

    class JsonErrors(web_protocol.RequestHandler):
        __slots__ = ()

        def handle_error(self, request, status=500, exc=None, message=None):
            plain = super().handle_error(request, status, exc, message)  # logs, as aiohttp does
            text = (message or plain.text or plain.reason or "").strip().splitlines()
            response = web.json_response(
                {"error": f"{plain.reason}: {text[0]}" if text else plain.reason,
                 "field": "request"}, status=plain.status)
            response.force_close()
            return response

    return JsonErrors


class _Refused(asyncio.Protocol):
    """Answers a connection over the cap with 503 and closes it."""

    def connection_made(self, transport):
        body = b'{"error": "too many connections", "field": null}'
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()


async def serve_forever(app, host, port, timeout_s=30.0, max_connections=DEFAULT_MAX_CONNECTIONS,
                        started=None):
    """Serves `app` until SIGINT/SIGTERM.

    A connection that has not sent a whole request head within `timeout_s` (aiohttp's keep-alive
    timer runs from the connection's start and while it waits for a request) is closed; a body
    that has not arrived by then gets 408 (`make_app`). Over `max_connections` open connections,
    a new one gets 503 and is closed at once, so slow clients cannot pile up without bound.
    """
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, keepalive_timeout=timeout_s)
    await runner.setup()
    handler = runner.server
    json_errors = _json_error_handler()

    def protocol():
        if len(handler.connections) >= max_connections:
            return _Refused()
        return json_errors(handler, loop=asyncio.get_running_loop(), **handler._kwargs)

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(protocol, host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started()
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()


def _dumps(value):
    """JSON bytes of an answer: orjson writes numpy arrays itself, 25x faster than
    `json.dumps` of `.tolist()` (3.3 ms per 3,000-float prediction), which was a third of the
    server's time per request under load."""
    import orjson

    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _text_dumps(value):
    return _dumps(value).decode()
