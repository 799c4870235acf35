"""reid-serve's HTTP handlers and middlewares over one `server.Server`, and its routes, each
declared once in `ROUTES` (the POST verbs in `server.VERBS`); `app.make_app` wires them into the
aiohttp application. Imported when the application is made (aiohttp loads only for serving)."""

import asyncio
import json
import os
import sys
import time

from aiohttp import web

from reid_tf.deploy.gallery.contract import GalleryFull
from reid_tf.deploy.gallery.contract import GalleryUnavailable
from reid_tf.deploy.serving.requests import BadRequest
from reid_tf.deploy.serving.requests import BodyTimeout
from reid_tf.deploy.serving.requests import Overloaded
from reid_tf.deploy.serving.requests import RequestTooLarge
from reid_tf.deploy.serving.server import VERBS

MODEL_PREFIXES = ("/v1/models/{name}", "/v1/models/{name}/versions/{version}")
# (HTTP method, path, handler, metrics label); `{model}` paths are served under each of
# `MODEL_PREFIXES`. A POST `:{method}` is one of `server.VERBS`, labelled by its verb.
ROUTES = (
    ("GET", "{model}", "status", "status"),
    ("GET", "{model}/metadata", "metadata", "metadata"),
    ("POST", "{model}:{method}", "post", None),
    ("GET", "{model}/gallery", "gallery", "gallery"),
    ("GET", "{model}/gallery/entries", "entries", "entries"),
    ("GET", "{model}/gallery/thumbnails/{entry_id:.+}", "thumbnail", "thumbnail"),
    ("GET", "/metrics", "exposition", "metrics"),
)
PAGE_ROUTES = (("GET", "/", "page", "ui"), ("GET", "/ui/{file}", "page", "ui"))
UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
            "placeholder.svg": "image/svg+xml"}


def error(status, message, field=None):
    """reid-serve's error answer: `{"error", "field"}`."""
    return web.json_response({"error": message, "field": field}, status=status)


class Handlers:
    """The request handlers of one server; `labels` maps each to its route label in the
    metrics."""

    def __init__(self, server, timeout_s):
        self.server = server
        self.timeout_s = timeout_s
        self.labels = {getattr(self, handler): label
                       for _, _, handler, label in ROUTES + PAGE_ROUTES if label}

    def add_routes(self, router, ui=True):
        """Every route of `ROUTES` (and the page's, with `ui`) on an aiohttp router."""
        for method, path, handler, _ in ROUTES + (PAGE_ROUTES if ui else ()):
            paths = ([path.replace("{model}", prefix) for prefix in MODEL_PREFIXES]
                     if path.startswith("{model}") else [path])
            for each in paths:
                router.add_route(method, each, getattr(self, handler))

    def check_model(self, request):
        name = request.match_info["name"]
        if request.method != "POST" and ":" in name and name.split(":")[-1] in VERBS:
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])  # GET on :predict & co
        if name != self.server.model_name:
            raise web.HTTPNotFound(text=json.dumps(
                {"error": f"Servable not found for request: Latest({name})", "field": "name"}),
                content_type="application/json")
        version = request.match_info.get("version")
        if version is not None and version != str(self.server.export.version):
            raise web.HTTPNotFound(text=json.dumps(
                {"error": f"version {version} not found; serving {self.server.export.version}",
                 "field": "version"}), content_type="application/json")

    async def read_json(self, request, deadline):
        loop = asyncio.get_running_loop()
        try:  # a body that trickles in, or stalls, is cut off at the request's time limit
            data = await asyncio.wait_for(request.read(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise BodyTimeout() from None
        try:  # parsed on the server's parsing pool: a 30 MB body never holds the event loop
            return await loop.run_in_executor(self.server.pool, json.loads, data)
        except (UnicodeDecodeError, json.JSONDecodeError) as problem:
            raise BadRequest("body", f"malformed JSON: {problem}") from None
        except RecursionError:
            raise BadRequest("body", "JSON nested too deeply.") from None

    async def status(self, request):
        self.check_model(request)
        return web.json_response(self.server.status())

    async def metadata(self, request):
        self.check_model(request)
        return web.json_response(self.server.metadata())

    async def post(self, request):
        self.check_model(request)
        method = request.match_info["method"]
        if method not in VERBS:
            verbs = [f":{verb}" for verb in VERBS]
            raise BadRequest("method", f":{method}; expected {', '.join(verbs[:-1])} or "
                             f"{verbs[-1]}.")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body = await self.read_json(request, deadline)
        result = await asyncio.wait_for(self.server.answer(method, body),
                                        max(deadline - loop.time(), 0.001))
        data = await loop.run_in_executor(self.server.pool, dumps, result)
        return web.Response(body=data, content_type="application/json")

    async def gallery_read(self, request, read, *arguments):
        self.check_model(request)
        loop = asyncio.get_running_loop()  # the store's lock may be held: never on the loop
        return await asyncio.wait_for(loop.run_in_executor(self.server.gallery_pool, read,
                                                           *arguments), self.timeout_s)

    async def gallery(self, request):
        return web.json_response(await self.gallery_read(request, self.server.gallery_stats),
                                 dumps=text_dumps)

    async def entries(self, request):
        return web.json_response(await self.gallery_read(
            request, self.server.gallery_entries, dict(request.query)), dumps=text_dumps)

    async def thumbnail(self, request):
        entry_id = request.match_info["entry_id"]
        data = await self.gallery_read(request, self.server.thumbnail, entry_id)
        if data is None:
            return error(404, f"entry {entry_id!r} has no thumbnail (absent, or added as an "
                         "embedding)", "entry_id")
        return web.Response(body=data, content_type="image/jpeg",
                            headers={"Cache-Control": "no-cache"})

    async def page(self, request):
        name = request.match_info.get("file", "index.html")
        if name == "config.json":  # what the page needs to address the API
            return web.json_response({"model_name": self.server.model_name,
                                      "version": str(self.server.export.version),
                                      "gallery": self.server.gallery is not None})
        if name not in UI_FILES:
            raise web.HTTPNotFound()
        with open(os.path.join(UI_DIR, name), "rb") as f:
            body = f.read()
        return web.Response(body=body, content_type=UI_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    async def exposition(self, request):
        body, content_type = self.server.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self, app):
        self.server.batcher.start()

    async def stop(self, app):
        await self.server.batcher.stop()
        if self.server.gallery is not None:
            self.server.gallery.close()  # writes the index file


def metrics_middleware(handlers):
    """Counts every request and its latency by route and status."""

    @web.middleware
    async def metrics(request, handler):
        start = time.perf_counter()
        # Labels never come from the client: a made-up verb is counted as "unknown".
        verb = request.match_info.get("method")
        route = (verb if verb in VERBS else "unknown") if verb is not None else (
            handlers.labels.get(request.match_info.handler, "unknown"))
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as problem:
            status = problem.status
            raise
        finally:
            handlers.server.metrics.requests.labels(route, str(status)).inc()
            handlers.server.metrics.latency.labels(route).observe(time.perf_counter() - start)

    return metrics


def errors_middleware(max_body_bytes, timeout_s):
    """Every failure as reid-serve's JSON error, with its status (and Retry-After on 503)."""

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
        except GalleryFull as problem:  # 507 Insufficient Storage: nothing was written
            return error(507, str(problem), "gallery")
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

    return errors


def dumps(value):
    """JSON bytes of an answer: orjson writes numpy arrays itself, 25x faster than
    `json.dumps` of `.tolist()` (3.3 ms per 3,000-float prediction), which was a third of the
    server's time per request under load."""
    import orjson

    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def text_dumps(value):
    return dumps(value).decode()
