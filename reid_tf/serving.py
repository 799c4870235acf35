"""reid-serve: an HTTP server for an export, with TF Serving's REST API and gallery search.

    reid-serve --export=runs/demo/export/1140 --port=8501 --gallery=gallery.npz
    reid-serve --export=runs/demo/export/1140 --gallery_images=../shared/data/x/bounding_box_test

Endpoints (`<name>` is --model_name; `/versions/<v>` may follow it, as in TF Serving):
- `GET  /v1/models/<name>`: model status; `GET /v1/models/<name>/metadata`: signatures.
- `POST /v1/models/<name>:predict`: `{"instances": [...]}` (or `{"inputs": [...]}`), each image
  `{"b64": "<JPEG/PNG base64>"}` or a nested uint8 array `[H][W][3]`; returns
  `{"predictions": [{"embedding": [...], "global_embedding": ..., ...}, ...]}`
  (`{"outputs": {...}}` for `inputs`), as TensorFlow Serving does.
- `POST /v1/models/<name>:search`: the same images plus `"k"` (default 10); returns
  `{"results": [[{"file_name", "person_id", "camera_id", "distance"}, ...], ...]}`, nearest first,
  distance = 1 - cosine similarity, from a faiss index of the gallery (exact inner product by
  default; `--index=ivf` for large galleries).

Bad requests get 400 (413 for a body over --max_body_mb) with `{"error": ..., "field": ...}`;
a request over --timeout_s gets 504. The server never stops on a bad request.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import os
import sys
import time

import numpy as np

from reid_tf import batching
from reid_tf import features
from reid_tf import gallery_store

MAX_RESULTS = 1000
DEFAULT_MAX_IMAGE_PIXELS = 1 << 22  # 4.2 megapixels (2048 x 2048): 12 MiB decoded
DEFAULT_MAX_CONNECTIONS = 256


class BadRequest(Exception):
    """A client error: `field` names the part of the request that is wrong."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field
        self.message = message


class Overloaded(Exception):
    """The batching queue is full (answered 503 with Retry-After)."""


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered 408, connection closed)."""


def parse_images(body, max_batch, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A TF Serving request body -> ("encoded", [bytes]) or ("images", uint8 [N,H,W,3]).

    Encoded images larger than `max_image_pixels` (read from the header, before any decoding:
    a small PNG can declare 20000 x 20000) are refused. Raises BadRequest naming the field for
    anything else.
    """
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object with 'instances' or 'inputs'.")
    signature = body.get("signature_name")
    if signature not in (None, "", "serving_default", "serve_encoded"):
        raise BadRequest("signature_name", f"{signature!r}; expected serving_default (uint8 "
                         "arrays) or serve_encoded (b64 images).")
    if ("instances" in body) == ("inputs" in body):
        raise BadRequest("instances", "expected exactly one of 'instances' and 'inputs'.")
    field = "instances" if "instances" in body else "inputs"
    instances = body[field]
    if isinstance(instances, dict):  # columnar, named input
        if set(instances) != {"images"}:
            raise BadRequest(field, "expected the one input 'images'.")
        field, instances = f"{field}.images", instances["images"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(field, "expected a non-empty list of images.")
    if len(instances) > max_batch:
        raise BadRequest(field, f"{len(instances)} images; at most {max_batch} per request.")
    instances = [item["images"] if isinstance(item, dict) and set(item) == {"images"} else item
                 for item in instances]
    if all(isinstance(item, dict) for item in instances):
        if signature == "serving_default":  # as TF Serving: that signature takes uint8 arrays
            raise BadRequest("signature_name", "serving_default takes uint8 arrays [H][W][3]; "
                             "b64 images go to serve_encoded.")
        encoded = [_decode_b64(item, f"{field}[{i}]") for i, item in enumerate(instances)]
        for i, data in enumerate(encoded):
            check_encoded_image(data, f"{field}[{i}].b64", max_image_pixels)
        return "encoded", encoded
    if signature == "serve_encoded":
        raise BadRequest("signature_name", "serve_encoded takes {\"b64\": ...} images; uint8 "
                         "arrays go to serving_default.")
    if any(isinstance(item, dict) for item in instances):
        raise BadRequest(field, "mixes {'b64': ...} images and arrays; send one kind per request.")
    images = [_uint8_image(item, f"{field}[{i}]") for i, item in enumerate(instances)]
    for i, image in enumerate(images):
        if image.shape != images[0].shape:
            raise BadRequest(f"{field}[{i}]", f"shape {list(image.shape)} differs from "
                             f"{field}[0]'s {list(images[0].shape)}; one size per request (or "
                             "send encoded images as b64).")
    return "images", np.stack(images)


def _decode_b64(item, field):
    if set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise BadRequest(field, "expected {\"b64\": \"<base64 of a JPEG/PNG image>\"}.")
    try:
        data = base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}.b64", "not valid base64.") from None
    if not data:
        raise BadRequest(f"{field}.b64", "empty image.")
    return data


def check_encoded_image(data, field, max_image_pixels):
    """Refuses an encoded image that is too large or does not decode, before it can reach the
    model: the size comes from the header (Pillow reads only that), so a small file declaring a
    huge image is refused without decoding it; then TensorFlow's decoder (the export's) must
    read the whole image."""
    _check_image_header(data, field, max_image_pixels)
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.OpError:
        raise BadRequest(field, "not a decodable JPEG/PNG/BMP/GIF image.") from None


def _check_image_header(data, field, max_image_pixels):
    """Refuses an encoded image whose header declares more than `max_image_pixels`, or that has
    no image header at all, without decoding its pixels (Pillow reads only the header)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:  # Pillow's own limit, where it is still set
        raise BadRequest(field, f"{error} At most {max_image_pixels} pixels per image "
                         "(--max_image_pixels).") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for what is not an image
        raise BadRequest(field, "not a decodable JPEG/PNG/BMP/GIF image.") from None
    if width * height > max_image_pixels:
        raise BadRequest(field, f"{width}x{height} = {width * height} pixels; at most "
                         f"{max_image_pixels} per image (--max_image_pixels).")


def _uint8_image(item, field):
    try:
        array = np.asarray(item)
    except ValueError:  # ragged nesting
        raise BadRequest(field, "ragged array; expected uint8 [H][W][3].") from None
    except RecursionError:
        raise BadRequest(field, "nested too deeply; expected uint8 [H][W][3].") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise BadRequest(field, f"shape {list(array.shape)}; expected [H][W][3] with H, W >= 1.")
    if array.dtype.kind not in "iu":
        raise BadRequest(field, f"values of type {array.dtype.name}; expected integers 0..255.")
    if array.min() < 0 or array.max() > 255:
        raise BadRequest(field, "values outside 0..255; expected uint8.")
    return array.astype(np.uint8)


class Metrics:
    """reid-serve's Prometheus metrics (prometheus_client, one registry per server)."""

    def __init__(self, registry=None):
        import prometheus_client as prometheus

        self.registry = registry or prometheus.CollectorRegistry()
        self.requests = prometheus.Counter(
            "reid_requests", "Requests by route and HTTP status.", ["route", "status"],
            registry=self.registry)
        self.latency = prometheus.Histogram(
            "reid_request_seconds", "Request latency by route, seconds.", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.batch_size = prometheus.Histogram(
            "reid_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry)
        self.queue_depth = prometheus.Gauge(
            "reid_queue_depth", "Images waiting for the model.", registry=self.registry)
        self.gallery_size = prometheus.Gauge(
            "reid_gallery_size", "Entries in the searchable index.", registry=self.registry)
        self.index_staleness = prometheus.Gauge(
            "reid_index_staleness_changes",
            "Committed gallery changes not yet in the persisted index file.",
            registry=self.registry)

    def exposition(self):
        import prometheus_client as prometheus

        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST


class Server:
    """The request handling of reid-serve, apart from HTTP.

    Requests are parsed and validated on `pool` (several at once; an image that is too large or
    does not decode is refused there, never reaching the model), then their images join the
    dynamic batcher, which merges concurrent requests into model calls run one at a time (each
    already uses every core). The gallery is a `gallery_store.GalleryStore`.
    """

    def __init__(self, export, gallery=None, model_name="reid", max_batch=64, threads=2,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_batch_size=16,
                 batch_timeout_ms=20.0, max_enqueued_batches=64):
        self.export = export
        self.gallery = gallery
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_image_pixels = max_image_pixels
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.metrics = Metrics()
        self.batcher = batching.Batcher(self.embed, max_batch_size, batch_timeout_ms,
                                        max_enqueued_batches,
                                        on_batch=self.metrics.batch_size.observe)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        if gallery is not None:
            self.metrics.gallery_size.set_function(lambda: len(self.gallery))
            self.metrics.index_staleness.set_function(self.gallery.staleness)

    def embed(self, kind, images):
        """One model call (the batcher's): embeddings of validated images."""
        try:
            if kind == "encoded":
                return self.export.embed_encoded(images)
            return self.export.embed_images(images)
        except Exception as error:  # TF's InvalidArgumentError: the model refused the input
            import tensorflow as tf

            if not isinstance(error, tf.errors.InvalidArgumentError):
                raise
            raise BadRequest("instances", f"the model refused the input: {error.message}")

    @staticmethod
    def predictions(outputs, columnar):
        """TF Serving's answer layout; arrays stay numpy (orjson writes them directly)."""
        if columnar:
            return {"outputs": {key: np.ascontiguousarray(value)
                                for key, value in outputs.items()}}
        keys = sorted(outputs)
        return {"predictions": [{key: np.ascontiguousarray(outputs[key][i]) for key in keys}
                                for i in range(len(outputs[keys[0]]))]}

    def search_options(self, body):
        """The checks of a search request that need no parsing: a gallery, k and filters."""
        if self.gallery is None:
            raise BadRequest("gallery", "this server has no gallery; start it with --gallery, "
                             "--gallery_images or --gallery_db.")
        body = body if isinstance(body, dict) else {}
        k = body.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RESULTS:
            raise BadRequest("k", f"expected an integer 1..{MAX_RESULTS}.")
        camera = body.get("exclude_camera")
        if camera is not None and (isinstance(camera, bool) or not isinstance(camera, int)):
            raise BadRequest("exclude_camera", "expected a camera id (integer).")
        time_range = body.get("time_range")
        if time_range is not None:
            if (not isinstance(time_range, list) or len(time_range) != 2
                    or not all(t is None or (isinstance(t, (int, float))
                                             and not isinstance(t, bool)) for t in time_range)):
                raise BadRequest("time_range", "expected [start, end] in seconds (either null).")
            time_range = tuple(time_range)
        return {"k": k, "exclude_camera": camera, "time_range": time_range}

    async def _embed_batched(self, kind, images):
        try:
            return await self.batcher.submit(kind, images)
        except batching.QueueFull:
            raise Overloaded() from None

    async def answer(self, method, body):
        """The JSON answer of `:predict`, `:search`, `:add` or `:remove` for a JSON body."""
        loop = asyncio.get_running_loop()
        if method == "remove":
            if not isinstance(body, dict) or "ids" not in body:
                raise BadRequest("ids", "expected {\"ids\": [...]}.")
            self._need_gallery()
            removed = await loop.run_in_executor(self.pool, self._store_call,
                                                 self.gallery.remove, body["ids"])
            return {"removed": removed}
        if method == "add":
            self._need_gallery()
            entries, groups = await loop.run_in_executor(self.pool, self.parse_entries, body)
            for kind, positions, images in groups:
                outputs = await self._embed_batched(kind, images)
                for position, embedding in zip(positions, outputs["embedding"]):
                    entries[position]["embedding"] = embedding
            added = await loop.run_in_executor(self.pool, self._store_call, self.gallery.add,
                                               entries)
            return {"added": added}
        options = self.search_options(body) if method == "search" else None
        if method == "search" and isinstance(body, dict) and "embeddings" in body:
            outputs = {"embedding": self._query_embeddings(body["embeddings"])}
        else:
            kind, images = await loop.run_in_executor(self.pool, parse_images, body,
                                                      self.max_batch, self.max_image_pixels)
            outputs = await self._embed_batched(kind, images)
        if method == "search":
            results = await loop.run_in_executor(
                self.pool, lambda: self.gallery.search(outputs["embedding"], **options))
            for matches in results:
                for match in matches:
                    match["file_name"] = match["id"]  # the name of the earlier API
            return {"results": results}
        return await loop.run_in_executor(self.pool, self.predictions, outputs,
                                          isinstance(body, dict) and "inputs" in body)

    def _query_embeddings(self, embeddings):
        """`:search` by precomputed embeddings (e.g. from reid-extract) instead of images."""
        try:
            array = np.asarray(embeddings, np.float32)
        except (ValueError, TypeError, RecursionError):
            raise BadRequest("embeddings", "expected a list of embeddings.") from None
        width = self.gallery.dimension
        if array.ndim != 2 or array.shape[1] != width or not len(array) \
                or len(array) > self.max_batch or not np.isfinite(array).all():
            raise BadRequest("embeddings", f"expected 1..{self.max_batch} rows of {width} "
                             "finite numbers.")
        return array

    def _need_gallery(self):
        if self.gallery is None:
            raise BadRequest("gallery", "this server has no gallery.")

    @staticmethod
    def _store_call(function, argument):
        try:
            return function(argument)
        except gallery_store.GalleryError as error:
            raise BadRequest(error.field, error.message) from None

    def parse_entries(self, body):
        """`{"entries": [...]}` of `:add` -> entries without image fields, and the images to
        embed as `[(kind, positions, images)]` (b64 together; arrays by shape)."""
        if not isinstance(body, dict) or not isinstance(body.get("entries"), list) \
                or not body["entries"]:
            raise BadRequest("entries", "expected {\"entries\": [{\"id\": ..., \"b64\" | "
                             "\"image\" | \"embedding\": ...}, ...]}.")
        if len(body["entries"]) > self.max_batch:
            raise BadRequest("entries", f"{len(body['entries'])} entries; at most "
                             f"{self.max_batch} per request.")
        entries, encoded, arrays = [], [], {}
        for i, item in enumerate(body["entries"]):
            field = f"entries[{i}]"
            if not isinstance(item, dict):
                raise BadRequest(field, "expected an object.")
            sources = [key for key in ("b64", "image", "embedding") if key in item]
            if len(sources) != 1:
                raise BadRequest(field, "expected exactly one of 'b64', 'image', 'embedding'.")
            entry = {key: value for key, value in item.items()
                     if key not in ("b64", "image")}
            if sources == ["b64"]:
                data = _decode_b64({"b64": item["b64"]}, field)
                check_encoded_image(data, f"{field}.b64", self.max_image_pixels)
                encoded.append((i, data))
            elif sources == ["image"]:
                image = _uint8_image(item["image"], f"{field}.image")
                arrays.setdefault(image.shape, []).append((i, image))
            entries.append(entry)
        groups = []
        if encoded:
            groups.append(("encoded", [i for i, _ in encoded], [d for _, d in encoded]))
        for items in arrays.values():
            groups.append(("images", [i for i, _ in items], np.stack([a for _, a in items])))
        return entries, groups

    def status(self):
        return {"model_version_status": [{
            "version": str(self.export.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata(self):
        return {"model_spec": {"name": self.model_name, "signature_name": "",
                               "version": str(self.export.version)},
                "metadata": self.export.signature_def()}


def make_app(server, max_body_bytes=32 << 20, timeout_s=30.0):
    """The aiohttp application of `server`."""
    from aiohttp import web

    def error(status, message, field=None):
        return web.json_response({"error": message, "field": field}, status=status)

    async def read_json(request, deadline):
        loop = asyncio.get_running_loop()
        try:  # a body that trickles in, or stalls, is cut off at the request's time limit
            data = await asyncio.wait_for(request.read(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise BodyTimeout() from None
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as problem:
            raise BadRequest("body", f"malformed JSON: {problem}") from None
        except RecursionError:
            raise BadRequest("body", "JSON nested too deeply.") from None

    def check_model(request):
        name = request.match_info["name"]
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
        route = request.match_info.get("method") or ROUTES.get(request.match_info.handler,
                                                               "unknown")
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
        except BodyTimeout:
            response = error(408, f"request body not received within {timeout_s} s", "body")
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"body over {max_body_bytes} bytes", "body")
        except asyncio.TimeoutError:
            return error(504, f"request took over {timeout_s} s", None)
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
        if method not in ("predict", "search", "add", "remove"):
            raise BadRequest("method", f":{method}; expected :predict, :search, :add or "
                             ":remove.")
        deadline = asyncio.get_running_loop().time() + timeout_s
        body = await read_json(request, deadline)
        result = await asyncio.wait_for(server.answer(method, body),
                                        max(deadline - asyncio.get_running_loop().time(), 0.001))
        return web.Response(body=_dumps(result), content_type="application/json")

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
    app.router.add_get("/metrics", exposition)
    ROUTES.update({status: "status", metadata: "metadata", exposition: "metrics"})
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


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

    def protocol():
        if len(handler.connections) >= max_connections:
            return _Refused()
        return handler()

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


def index_spec(index, nlist):
    """--index as a faiss index_factory string (the old names flat and ivf still work)."""
    return {"flat": "Flat", "ivf": f"IVF{nlist},Flat"}.get(index, index)


def open_gallery(export, gallery_db=None, npz=None, images=None, index="Flat", nprobe=16,
                 ef_search=64, persist_every=1000, log=print):
    """The server's GalleryStore: `gallery_db` (durable; ":memory:" when None), seeded from a
    features.npz or a folder of images when it is empty."""
    if npz and images:
        raise ValueError("give one of --gallery and --gallery_images.")
    width = export.signatures["serving_default"].structured_outputs["embedding"].shape[-1]
    store = gallery_store.GalleryStore(gallery_db or ":memory:", dimension=width, index=index,
                                       nprobe=nprobe, ef_search=ef_search,
                                       persist_every=persist_every, log=log)
    if npz or images:
        if store.count():
            log(f"gallery: {gallery_db} already holds {store.count()} entries; "
                f"{npz or images} not imported again")
        else:
            if npz:
                arrays = features.load_features(npz)
            else:
                split = features.load_split(images=images, split="gallery")
                arrays = features.feature_arrays(features.extract(export, split),
                                                 split.file_names, split.person_ids,
                                                 split.camera_ids)
            log(f"gallery: imported {store.import_features(arrays)} entries from "
                f"{npz or images}")
    return store


def run():
    """reid-serve: serve an export (and a gallery) over HTTP."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app
    from absl import flags

    flags.DEFINE_string("export", None, "A SavedModel export folder (<export_dir>/<version>).")
    flags.DEFINE_string("model_name", "reid", "The <name> of /v1/models/<name>.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8501, "Port (TF Serving's REST port is 8501).")
    flags.DEFINE_string("gallery_db", None, "The live gallery's SQLite file (created if missing; "
                        "the source of truth, survives restarts). Without it the gallery lives "
                        "in memory only.")
    flags.DEFINE_string("gallery", None, "A features.npz (reid-extract) that seeds an empty "
                        "gallery.")
    flags.DEFINE_string("gallery_images", None, "Or a folder of gallery images, extracted at "
                        "start (a Market layout root: its bounding_box_test).")
    flags.DEFINE_string("index", "Flat", "faiss index_factory string of the gallery index: Flat "
                        "(exact), IVF4096,SQ8, IVF4096,PQ64, HNSW32, ... (flat and ivf: the "
                        "earlier names).")
    flags.DEFINE_integer("nlist", 100, "IVF lists when --index=ivf.")
    flags.DEFINE_integer("nprobe", 16, "IVF lists searched per query.")
    flags.DEFINE_integer("ef_search", 64, "HNSW search breadth.")
    flags.DEFINE_integer("persist_every", 1000, "Write the index file every this many gallery "
                         "changes (and at shutdown).")
    flags.DEFINE_integer("max_batch", 64, "Most images in one request.")
    flags.DEFINE_integer("max_batch_size", 16, "Most images in one model call (dynamic "
                         "batching merges concurrent requests up to this).")
    flags.DEFINE_float("batch_timeout_ms", 20.0, "Under concurrency, how long a request waits "
                       "for others to share its model call (a lone request never waits).")
    flags.DEFINE_integer("max_enqueued_batches", 64, "Queue bound, in batches; more gets 503 "
                         "with Retry-After.")
    flags.DEFINE_float("max_body_mb", 32, "Largest request body, MiB.")
    flags.DEFINE_float("timeout_s", 30, "Per-request time limit, seconds.")
    flags.DEFINE_integer("threads", 2, "Requests parsed and validated at once.")
    flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Largest encoded image, "
                         "width x height, read from its header before decoding (a small file can "
                         "declare a huge image).")
    flags.DEFINE_integer("max_connections", DEFAULT_MAX_CONNECTIONS, "Most open connections; "
                         "more get 503.")
    flags.mark_flag_as_required("export")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        import logging

        from PIL import Image

        options = flags.FLAGS
        for name in ("max_batch", "max_image_pixels", "max_connections", "threads",
                     "max_batch_size", "max_enqueued_batches"):
            if getattr(options, name) < 1:
                raise app.UsageError(f"--{name}: expected a positive integer.")
        # Pillow only reads headers here (TensorFlow decodes), and --max_image_pixels is the
        # limit: Pillow's own bomb check would refuse before the size could be reported.
        Image.MAX_IMAGE_PIXELS = None
        features.enable_memory_growth()
        try:
            export = features.Export(options.export)
            gallery = None
            if options.gallery_db or options.gallery or options.gallery_images:
                gallery = open_gallery(
                    export, options.gallery_db, options.gallery, options.gallery_images,
                    index_spec(options.index, options.nlist), options.nprobe,
                    options.ef_search, options.persist_every,
                    log=lambda line: print(line, flush=True))
        except (ValueError, OSError, RuntimeError) as problem:  # RuntimeError: faiss's
            print(f"reid-serve: error: {str(problem).strip().splitlines()[0]}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        server = Server(export, gallery, options.model_name, options.max_batch, options.threads,
                        options.max_image_pixels, options.max_batch_size,
                        options.batch_timeout_ms, options.max_enqueued_batches)
        application = make_app(server, int(options.max_body_mb * (1 << 20)), options.timeout_s)
        access = logging.getLogger("aiohttp.access")  # one line per request, on stdout
        access.setLevel(logging.INFO)
        access.addHandler(logging.StreamHandler(sys.stdout))
        access.propagate = False
        asyncio.run(serve_forever(
            application, options.host, options.port, options.timeout_s, options.max_connections,
            started=lambda: print(
                f"serving {export.path} as '{options.model_name}' (version {export.version})"
                + (f" with a gallery of {len(gallery)}" if gallery else "")
                + f" on http://{options.host}:{options.port}", flush=True)))

    app.run(main)


if __name__ == "__main__":
    run()
