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

import numpy as np

from reid_tf import features

MAX_RESULTS = 1000
DEFAULT_MAX_IMAGE_PIXELS = 1 << 22  # 4.2 megapixels (2048 x 2048): 12 MiB decoded
DEFAULT_MAX_CONNECTIONS = 256


class BadRequest(Exception):
    """A client error: `field` names the part of the request that is wrong."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field
        self.message = message


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered 408, connection closed)."""


class Gallery:
    """A faiss index over L2-normalised gallery embeddings with their file names and labels.

    `index="flat"`: exact inner product (`IndexFlatIP`); `"ivf"`: `IndexIVFFlat` with `nlist`
    inverted lists (trained on the gallery itself) searching `nprobe` of them.
    """

    def __init__(self, embeddings, file_names, person_ids=None, camera_ids=None, index="flat",
                 nlist=100, nprobe=10):
        import faiss

        embeddings = np.ascontiguousarray(embeddings, np.float32)
        if embeddings.ndim != 2 or not len(embeddings):
            raise ValueError(f"gallery embeddings: shape {embeddings.shape}; expected [N>0, E].")
        dimension = embeddings.shape[1]
        if index == "flat":
            self.index = faiss.IndexFlatIP(dimension)
        elif index == "ivf":
            if nlist < 1 or nlist > len(embeddings):
                raise ValueError(f"--nlist={nlist}: expected 1..{len(embeddings)} (the gallery "
                                 "size) for an IVF index.")
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist,
                                            faiss.METRIC_INNER_PRODUCT)
            self.index.train(embeddings)
            self.index.nprobe = nprobe
        else:
            raise ValueError(f"--index={index}: expected flat or ivf.")
        self.index.add(embeddings)
        self.file_names = np.asarray(file_names, dtype=str)
        self.person_ids = None if person_ids is None else np.asarray(person_ids, np.int64)
        self.camera_ids = None if camera_ids is None else np.asarray(camera_ids, np.int64)

    @classmethod
    def from_features(cls, arrays, **index_options):
        return cls(arrays["embeddings"], arrays["file_names"], arrays.get("person_ids"),
                   arrays.get("camera_ids"), **index_options)

    def __len__(self):
        return self.index.ntotal

    def search(self, queries, k):
        """Top-k matches of each query, nearest first: lists of dicts."""
        similarities, indices = self.index.search(np.ascontiguousarray(queries, np.float32),
                                                  min(k, len(self)))
        results = []
        for row_similarities, row_indices in zip(similarities, indices):
            results.append([{
                "file_name": str(self.file_names[i]),
                "person_id": None if self.person_ids is None else int(self.person_ids[i]),
                "camera_id": None if self.camera_ids is None else int(self.camera_ids[i]),
                "distance": float(1.0 - s),
            } for s, i in zip(row_similarities, row_indices) if i >= 0])
        return results


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
        raise BadRequest("signature_name", f"{signature!r}; expected serving_default or "
                         "serve_encoded (b64 images use serve_encoded whatever is named).")
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
        encoded = [_decode_b64(item, f"{field}[{i}]") for i, item in enumerate(instances)]
        for i, data in enumerate(encoded):
            _check_image_header(data, f"{field}[{i}].b64", max_image_pixels)
        return "encoded", encoded
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


class Server:
    """The request handling of reid-serve, apart from HTTP.

    A request is parsed and answered on `pool` (several at once), while the model runs on
    `model_pool`, one call at a time (each call already uses every core): a malformed request is
    answered without waiting for the model, and parsing overlaps the model's work.
    """

    def __init__(self, export, gallery=None, model_name="reid", max_batch=64, threads=2,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
        self.export = export
        self.gallery = gallery
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_image_pixels = max_image_pixels
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.model_pool = concurrent.futures.ThreadPoolExecutor(1)

    def embed(self, kind, images):
        try:
            if kind == "encoded":
                return self.export.embed_encoded(images)
            return self.export.embed_images(images)
        except Exception as error:  # TF's InvalidArgumentError on an undecodable image
            import tensorflow as tf

            if not isinstance(error, tf.errors.InvalidArgumentError):
                raise
            index = features.first_undecodable(images) if kind == "encoded" else None
            if index is not None:
                raise BadRequest(f"instances[{index}].b64",
                                 "not a decodable JPEG/PNG/BMP image.") from None
            raise BadRequest("instances", f"the model refused the input: {error.message}")

    @staticmethod
    def predictions(outputs, columnar):
        if columnar:
            return {"outputs": {key: value.tolist() for key, value in outputs.items()}}
        keys = sorted(outputs)
        return {"predictions": [{key: outputs[key][i].tolist() for key in keys}
                                for i in range(len(outputs[keys[0]]))]}

    def search_k(self, body):
        """The checks of a search request that need no parsing: a gallery, and `k`."""
        if self.gallery is None:
            raise BadRequest("gallery", "this server has no gallery; start it with --gallery or "
                             "--gallery_images.")
        k = body.get("k", 10) if isinstance(body, dict) else 10
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RESULTS:
            raise BadRequest("k", f"expected an integer 1..{MAX_RESULTS}.")
        return k

    async def answer(self, method, body):
        """The JSON answer of `:predict` or `:search` for a parsed JSON body."""
        loop = asyncio.get_running_loop()
        k = self.search_k(body) if method == "search" else None
        kind, images = await loop.run_in_executor(self.pool, parse_images, body, self.max_batch,
                                                  self.max_image_pixels)
        outputs = await loop.run_in_executor(self.model_pool, self.embed, kind, images)
        if method == "search":
            return {"results": await loop.run_in_executor(
                self.pool, self.gallery.search, outputs["embedding"], k)}
        return await loop.run_in_executor(self.pool, self.predictions, outputs,
                                          isinstance(body, dict) and "inputs" in body)

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
    async def errors(request, handler):
        try:
            return await handler(request)
        except BadRequest as problem:
            return error(400, problem.message, problem.field)
        except BodyTimeout:
            response = error(408, f"request body not received within {timeout_s} s", "body")
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"body over {max_body_bytes} bytes", "body")
        except asyncio.TimeoutError:
            return error(504, f"request took over {timeout_s} s", None)
        except web.HTTPException:
            raise
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
        if method not in ("predict", "search"):
            raise BadRequest("method", f":{method}; expected :predict or :search.")
        deadline = asyncio.get_running_loop().time() + timeout_s
        body = await read_json(request, deadline)
        result = await asyncio.wait_for(server.answer(method, body),
                                        max(deadline - asyncio.get_running_loop().time(), 0.001))
        return web.json_response(result, dumps=_dumps)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors])
    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
        app.router.add_get(prefix, status)
        app.router.add_get(prefix + "/metadata", metadata)
        app.router.add_post(prefix + ":{method}", post)
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
    return json.dumps(value, separators=(",", ":"))


def run():
    """reid-serve: serve an export (and a gallery) over HTTP."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app
    from absl import flags

    flags.DEFINE_string("export", None, "A SavedModel export folder (<export_dir>/<version>).")
    flags.DEFINE_string("model_name", "reid", "The <name> of /v1/models/<name>.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8501, "Port (TF Serving's REST port is 8501).")
    flags.DEFINE_string("gallery", None, "A features.npz (reid-extract) to search.")
    flags.DEFINE_string("gallery_images", None, "Or a folder of gallery images, extracted at "
                        "start (a Market layout root: its bounding_box_test).")
    flags.DEFINE_enum("index", "flat", ["flat", "ivf"], "faiss index: exact inner product, or "
                      "IVF for large galleries.")
    flags.DEFINE_integer("nlist", 100, "IVF lists.")
    flags.DEFINE_integer("nprobe", 10, "IVF lists searched per query.")
    flags.DEFINE_integer("max_batch", 64, "Most images in one request.")
    flags.DEFINE_float("max_body_mb", 32, "Largest request body, MiB.")
    flags.DEFINE_float("timeout_s", 30, "Per-request time limit, seconds.")
    flags.DEFINE_integer("threads", 2, "Requests parsed and answered at once (model calls run one "
                         "at a time, each on every core).")
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

        options = flags.FLAGS
        from PIL import Image

        # Pillow only reads headers here (TensorFlow decodes), and --max_image_pixels is the
        # limit: Pillow's own bomb check would refuse before the size could be reported.
        Image.MAX_IMAGE_PIXELS = None
        try:
            export = features.Export(options.export)
            gallery = None
            if options.gallery and options.gallery_images:
                raise ValueError("give one of --gallery and --gallery_images.")
            if options.gallery:
                arrays = features.load_features(options.gallery)
            elif options.gallery_images:
                split = features.load_split(images=options.gallery_images, split="gallery")
                arrays = features.feature_arrays(features.extract(export, split),
                                                 split.file_names, split.person_ids,
                                                 split.camera_ids)
            if options.gallery or options.gallery_images:
                gallery = Gallery.from_features(arrays, index=options.index,
                                                nlist=options.nlist, nprobe=options.nprobe)
        except (ValueError, FileNotFoundError) as problem:
            print(f"reid-serve: error: {problem}", file=sys.stderr, flush=True)
            sys.exit(1)
        for name in ("max_batch", "max_image_pixels", "max_connections", "threads"):
            if getattr(options, name) < 1:
                raise app.UsageError(f"--{name}: expected a positive integer.")
        server = Server(export, gallery, options.model_name, options.max_batch, options.threads,
                        options.max_image_pixels)
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
