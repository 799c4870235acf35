"""The request handling of reid-serve, apart from HTTP: predict, search, verify, add, remove,
status, metadata, and the gallery's reads (stats, entries, thumbnails)."""

import asyncio
import concurrent.futures
import dataclasses
import math

import numpy as np

from reid_tf.deploy.gallery import thumbnails
from reid_tf.deploy.gallery.contract import EntryLimits
from reid_tf.deploy.gallery.contract import GalleryError
from reid_tf.deploy.gallery.contract import check_metadata
from reid_tf.deploy.serving import batching
from reid_tf.deploy.serving.metrics import Metrics
from reid_tf.deploy.serving.requests import MAX_RESULTS
from reid_tf.deploy.serving.requests import BadRequest
from reid_tf.deploy.serving.requests import DEFAULT_MAX_IMAGE_PIXELS
from reid_tf.deploy.serving.requests import Overloaded
from reid_tf.deploy.serving.requests import RequestTooLarge
from reid_tf.deploy.serving.requests import check_encoded_image
from reid_tf.deploy.serving.requests import decode_b64
from reid_tf.deploy.serving.requests import parse_images
from reid_tf.deploy.serving.requests import uint8_image
from reid_tf.evaluate import calibration as calibration_lib
from reid_tf.model.descriptors import unit_rows
from reid_tf.options import Option

DEFAULT_FAR = 1e-2
_LIMITS = EntryLimits()


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """How requests are taken and batched (reid-serve's options, each declared once)."""

    model_name: str = Option("reid", "The <name> of /v1/models/<name>.").field()
    max_batch: int = Option(64, "Most images in one request.", minimum=1).field()
    threads: int = Option(2, "Requests parsed and validated at once.", minimum=1).field()
    max_image_pixels: int = Option(
        DEFAULT_MAX_IMAGE_PIXELS, "Largest encoded image, width x height, read from its header "
        "before decoding (a small file can declare a huge image).", minimum=1).field()
    max_batch_size: int = Option(16, "Most images in one model call (dynamic batching merges "
                                 "concurrent requests up to this).", minimum=1).field()
    batch_timeout_ms: float = Option(20.0, "Under concurrency, how long a request waits for "
                                     "others to share its model call (a lone request never "
                                     "waits).", minimum=0.0).field()
    max_enqueued_batches: int = Option(64, "Queue bound, in batches; more gets 503 with "
                                       "Retry-After.", minimum=1).field()
    thumbnail_size: int = Option(thumbnails.DEFAULT_HEIGHT, "Height in pixels of the thumbnail "
                                 "stored with each entry added from an image (0: none).",
                                 minimum=0).field()
    max_metadata_bytes: int = Option(_LIMITS.max_metadata_bytes, "Largest metadata of one :add "
                                     "entry, bytes of JSON.", minimum=2).field()
    max_metadata_depth: int = Option(_LIMITS.max_metadata_depth, "Deepest nesting of an "
                                     "entry's metadata (objects and lists).", minimum=1).field()

    @property
    def limits(self):
        return EntryLimits(self.max_metadata_bytes, self.max_metadata_depth)


class Server:
    """The request handling of reid-serve, apart from HTTP.

    Requests are parsed and validated on `pool` (several at once; an image that is too large or
    does not decode is refused there, never reaching the model), then their images join the
    dynamic batcher, which merges concurrent requests into model calls run one at a time (each
    already uses every core). The gallery is a `gallery.contract.Gallery`; `export` a
    `deploy.runtime` runtime; `options` a `ServingOptions` (or a config with its fields).

    Decisions (`evaluate.calibration`): with a `calibration`, `:search` marks each hit `match`
    (and `p_same`) and each query `in_gallery` at the open-set threshold of `far` (or the
    request's `"far"`), and `:verify` decides a pair at the verification threshold. `:add` from
    images stores a JPEG thumbnail `thumbnail_size` pixels high with each entry (0: none).
    """

    def __init__(self, export, gallery=None, options=ServingOptions(), calibration=None,
                 far=DEFAULT_FAR):
        self.export = export
        self.limits = options.limits
        self.gallery = gallery
        self.calibration = calibration
        self.far = far
        self.thumbnail_size = options.thumbnail_size
        if calibration is not None:  # another model's, or a FAR not fitted or not supported
            calibration_lib.check_model(calibration, getattr(export, "model_id", None))
            for kind in calibration_lib.KINDS:
                calibration_lib.threshold(calibration, kind, far)
        self.model_name = options.model_name
        self.max_batch = options.max_batch
        self.max_image_pixels = options.max_image_pixels
        # Three kinds of work, three executors, so that none can starve another: request
        # parsing and JSON output (`pool`), gallery calls (`gallery_pool`: a slow filtered
        # search or a rebuild waits there), and the model (the batcher's one thread).
        self.pool = concurrent.futures.ThreadPoolExecutor(options.threads)
        self.gallery_pool = concurrent.futures.ThreadPoolExecutor(2)
        self.metrics = Metrics()
        self.batcher = batching.Batcher(self.embed, options.max_batch_size,
                                        options.batch_timeout_ms, options.max_enqueued_batches,
                                        on_batch=self.metrics.batch_size.observe)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        if gallery is not None:
            self.metrics.gallery_size.set_function(lambda: len(self.gallery))
            self.metrics.index_staleness.set_function(self.gallery.staleness)

    def embed(self, kind, images):
        """One model call (the batcher's): embeddings of validated images."""
        try:
            if kind == "encoded":
                return self.export.predict_encoded(images)
            return self.export.predict_images(images)
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
            if not all(t is None or math.isfinite(t) for t in time_range):
                raise BadRequest("time_range", "expected finite seconds (or null).")
            # [null, null] bounds nothing: no filter (entries without a timestamp stay in).
            time_range = None if time_range == [None, None] else tuple(time_range)
        if sum(key in body for key in ("embeddings", "instances", "inputs", "entry_ids")) > 1:
            raise BadRequest("instances", "give one of \"instances\", \"embeddings\" and "
                             "\"entry_ids\".")
        return {"k": k, "exclude_camera": camera, "time_range": time_range}

    def operating_point(self, body, kind):
        """`{"kind", "far", "threshold"}` of a request's decisions (its `"far"`, or the
        server's), or None without a calibration."""
        far = body.get("far") if isinstance(body, dict) else None
        if self.calibration is None:
            if far is not None:
                raise BadRequest("far", "this export carries no calibration, so there are no "
                                 "operating points (fit one: reid-eval --calibrate).")
            return None
        if far is None:
            far = self.far
        if isinstance(far, bool) or not isinstance(far, (int, float)):
            raise BadRequest("far", "expected a false-accept rate, e.g. 0.01.")
        try:
            threshold = calibration_lib.threshold(self.calibration, kind, far)
        except ValueError as error:
            raise BadRequest("far", str(error)) from None
        point = {"kind": kind, "far": far, "threshold": threshold}
        fitted = calibration_lib.fitted_point(self.calibration, kind, far)
        if "far_interval" in fitted:  # how sure: the rate measured on validation, 95 % interval
            point["measured_far"] = fitted["measured_far"]
            point["far_interval"] = fitted["far_interval"]
        return point

    def decide(self, results, point):
        """Marks `:search` hits `match`/`p_same` and says per query whether it is in the
        gallery (its nearest hit accepted)."""
        for matches in results:
            probabilities = calibration_lib.p_same(self.calibration,
                                                   [m["distance"] for m in matches])
            for i, match in enumerate(matches):
                match["match"] = bool(match["distance"] < point["threshold"])
                if probabilities is not None:
                    match["p_same"] = float(probabilities[i])
        return [bool(matches) and matches[0]["match"] for matches in results]

    async def _embed_batched(self, kind, images):
        try:
            return await self.batcher.submit(kind, images)
        except batching.QueueFull:
            raise Overloaded() from None
        except batching.TooLarge as error:
            raise RequestTooLarge(str(error)) from None

    async def answer(self, method, body):
        """The JSON answer of a POST verb (`VERBS`: `:predict`, `:search`, ...) for a JSON
        body."""
        return await VERBS[method](self, body)

    async def _remove(self, body):
        """`:remove`: entries out of the gallery, by id."""
        if not isinstance(body, dict) or "ids" not in body:
            raise BadRequest("ids", "expected {\"ids\": [...]}.")
        self._need_gallery()
        removed = await asyncio.get_running_loop().run_in_executor(
            self.gallery_pool, self._store_call, self.gallery.remove, body["ids"])
        return {"removed": removed}

    async def _add(self, body):
        """`:add`: entries into the gallery (images embedded first, in batches)."""
        loop = asyncio.get_running_loop()
        self._need_gallery()
        entries, groups = await loop.run_in_executor(self.pool, self.parse_entries, body)
        for kind, positions, images in groups:
            outputs = await self._embed_batched(kind, images)
            for position, embedding in zip(positions, outputs["embedding"]):
                entries[position]["embedding"] = embedding
        added = await loop.run_in_executor(self.gallery_pool, self._store_call,
                                           self.gallery.add, entries)
        return {"added": added}

    async def _predict(self, body):
        """`:predict`: TF Serving's answer of the model's outputs."""
        outputs = await self._embed_request(body, searched=False)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.predictions, outputs, isinstance(body, dict) and "inputs" in body)

    async def _search(self, body):
        """`:search`: the gallery's nearest entries of each query, with the decisions."""
        loop = asyncio.get_running_loop()
        options = self.search_options(body)
        point = self.operating_point(body, "open_set")
        outputs = await self._embed_request(body, searched=isinstance(body, dict))
        results, incomplete = await loop.run_in_executor(
            self.gallery_pool, lambda: self.gallery.search(outputs["embedding"], report=True,
                                                           **options))
        for matches in results:
            for match in matches:
                match["file_name"] = match["id"]  # the name of the earlier API
        answer = {"results": results}
        if point is not None:
            answer["in_gallery"] = self.decide(results, point)
            answer["operating_point"] = point
        if any(incomplete):  # a filter's bounded fetch ran out before k matches
            answer["incomplete"] = incomplete
        if body.get("return_masks") is True and "part_masks" in outputs:
            answer["part_masks"] = outputs["part_masks"]  # [N,h,w,K], for the page
        return answer

    async def _embed_request(self, body, searched):
        """The model's outputs for a request's images, or (a search only) its `embeddings` or
        the stored embeddings of its `entry_ids`."""
        loop = asyncio.get_running_loop()
        if searched and "embeddings" in body:
            return {"embedding": await loop.run_in_executor(
                self.pool, self._query_embeddings, body["embeddings"], self.gallery.dimension)}
        if searched and "entry_ids" in body:
            return {"embedding": await loop.run_in_executor(
                self.gallery_pool, self._entry_embeddings, body["entry_ids"])}
        kind, images = await loop.run_in_executor(self.pool, parse_images, body,
                                                  self.max_batch, self.max_image_pixels)
        return await self._embed_batched(kind, images)

    async def _verify(self, body):
        """`:verify`: are two images (or embeddings) of the same person?"""
        loop = asyncio.get_running_loop()
        point = self.operating_point(body, "verification")
        if isinstance(body, dict) and "embeddings" in body:
            pair = await loop.run_in_executor(self.pool, self._query_embeddings,
                                              body["embeddings"], self.export.embedding_width)
            field = "embeddings"
        else:
            kind, images = await loop.run_in_executor(self.pool, parse_images, body,
                                                      self.max_batch, self.max_image_pixels)
            pair = (await self._embed_batched(kind, images))["embedding"]
            field = "instances"
        if len(pair) != 2:
            raise BadRequest(field, f"expected exactly 2 to compare, not {len(pair)}.")
        pair = unit_rows(np.asarray(pair, np.float32))
        distance = float(1.0 - pair[0] @ pair[1])
        answer = {"distance": distance}
        if point is not None:
            # No p_same: it is fitted for a ranked hit (`calibration.TOP_K`), at the share of
            # the same person a ranked list has; a pair's odds are the caller's.
            answer["match"] = distance < point["threshold"]
            answer["operating_point"] = point
        return answer

    def _query_embeddings(self, embeddings, width):
        """`:search`/`:verify` by precomputed embeddings (e.g. from reid-extract)."""
        try:
            array = np.asarray(embeddings, np.float32)
        except (ValueError, TypeError, RecursionError):
            raise BadRequest("embeddings", "expected a list of embeddings.") from None
        if array.ndim != 2 or array.shape[1] != width or not len(array) \
                or len(array) > self.max_batch or not np.isfinite(array).all():
            raise BadRequest("embeddings", f"expected 1..{self.max_batch} rows of {width} "
                             "finite numbers.")
        for i, row in enumerate(array):  # as :add refuses it: a zero vector has no direction
            if not row.any():
                raise BadRequest(f"embeddings[{i}]", "all zeros: it has no direction.")
        return array

    def _entry_embeddings(self, entry_ids):
        """`:search` with gallery entries as the queries (the page's "search with this")."""
        if not isinstance(entry_ids, list) or not entry_ids or len(entry_ids) > self.max_batch \
                or not all(isinstance(i, str) for i in entry_ids):
            raise BadRequest("entry_ids", f"expected 1..{self.max_batch} entry ids (strings).")
        rows = []
        for i, entry_id in enumerate(entry_ids):
            entry = self.gallery.get(entry_id)
            if entry is None:
                raise BadRequest(f"entry_ids[{i}]", f"no gallery entry {entry_id!r}.")
            rows.append(entry["embedding"])
        return np.stack(rows)

    # ---------------------------------------------------------------- the gallery's reads

    def gallery_stats(self):
        self._need_gallery()
        return {**self.gallery.stats(), "decisions": self.decisions()}

    def decisions(self):
        """What the page shows of the operating points: None without a calibration."""
        if self.calibration is None:
            return None
        return {"far": self.far, "fars": calibration_lib.supported_fars(self.calibration),
                "p_same": "p_same" in self.calibration,
                "open_set": self.calibration["open_set"],
                "verification": self.calibration["verification"],
                "measured_on": self.calibration.get("measured_on")}

    def gallery_entries(self, query):
        """A page of entries (`offset`, `limit` from the query string), newest first."""
        self._need_gallery()
        values = {}
        for name, default, most in (("offset", 0, 1 << 62), ("limit", 50, MAX_RESULTS)):
            try:
                values[name] = int(query.get(name, default))
            except ValueError:
                raise BadRequest(name, "expected an integer.") from None
            if not 0 <= values[name] <= most:
                raise BadRequest(name, f"expected 0..{most}.")
        entries, total = self.gallery.browse(values["offset"], values["limit"])
        return {"entries": entries, "total": total, **values}

    def thumbnail(self, entry_id):
        self._need_gallery()
        return self.gallery.thumbnail(entry_id)

    def _need_gallery(self):
        if self.gallery is None:
            raise BadRequest("gallery", "this server has no gallery.")

    @staticmethod
    def _store_call(function, argument):
        try:
            return function(argument)
        except GalleryError as error:
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
            if "thumbnail" in item:
                raise BadRequest(f"{field}.thumbnail", "made by the server from the image "
                                 "(--thumbnail_size); not accepted.")
            if item.get("metadata") is not None:
                try:
                    check_metadata(item["metadata"], f"{field}.metadata", self.limits)
                except GalleryError as error:
                    raise BadRequest(error.field, error.message) from None
            entry = {key: value for key, value in item.items()
                     if key not in ("b64", "image")}
            image = None
            if sources == ["b64"]:
                data = image = decode_b64({"b64": item["b64"]}, field)
                check_encoded_image(data, f"{field}.b64", self.max_image_pixels)
                encoded.append((i, data))
            elif sources == ["image"]:
                image = uint8_image(item["image"], f"{field}.image")
                arrays.setdefault(image.shape, []).append((i, image))
            if image is not None and self.thumbnail_size:
                entry["thumbnail"] = thumbnails.thumbnail(image, self.thumbnail_size)
                if entry["thumbnail"] is None:
                    del entry["thumbnail"]
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


# The POST verbs, each declared here once: the route (`/v1/models/<name>:<verb>`), its metrics
# label and the error text naming the verbs are derived from this table.
VERBS = {"predict": Server._predict, "search": Server._search, "verify": Server._verify,
         "add": Server._add, "remove": Server._remove}
