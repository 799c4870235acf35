"""The request handling of reid-serve, apart from HTTP: predict, search, add, remove, status,
metadata."""

import asyncio
import concurrent.futures
import math

import numpy as np

from reid_tf.deploy.gallery import store as gallery_store
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


class Server:
    """The request handling of reid-serve, apart from HTTP.

    Requests are parsed and validated on `pool` (several at once; an image that is too large or
    does not decode is refused there, never reaching the model), then their images join the
    dynamic batcher, which merges concurrent requests into model calls run one at a time (each
    already uses every core). The gallery is a `gallery.store.GalleryStore`; `export` a `deploy.runtime.SavedModelRuntime`.
    """

    def __init__(self, export, gallery=None, model_name="reid", max_batch=64, threads=2,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_batch_size=16,
                 batch_timeout_ms=20.0, max_enqueued_batches=64):
        self.export = export
        self.gallery = gallery
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_image_pixels = max_image_pixels
        # Three kinds of work, three executors, so that none can starve another: request
        # parsing and JSON output (`pool`), gallery calls (`gallery_pool`: a slow filtered
        # search or a rebuild waits there), and the model (the batcher's one thread).
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.gallery_pool = concurrent.futures.ThreadPoolExecutor(2)
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
        if "embeddings" in body and "instances" in body:
            raise BadRequest("instances", "give one of \"embeddings\" and \"instances\".")
        return {"k": k, "exclude_camera": camera, "time_range": time_range}

    async def _embed_batched(self, kind, images):
        try:
            return await self.batcher.submit(kind, images)
        except batching.QueueFull:
            raise Overloaded() from None
        except batching.TooLarge as error:
            raise RequestTooLarge(str(error)) from None

    async def answer(self, method, body):
        """The JSON answer of `:predict`, `:search`, `:add` or `:remove` for a JSON body."""
        loop = asyncio.get_running_loop()
        if method == "remove":
            if not isinstance(body, dict) or "ids" not in body:
                raise BadRequest("ids", "expected {\"ids\": [...]}.")
            self._need_gallery()
            removed = await loop.run_in_executor(self.gallery_pool, self._store_call,
                                                 self.gallery.remove, body["ids"])
            return {"removed": removed}
        if method == "add":
            self._need_gallery()
            entries, groups = await loop.run_in_executor(self.pool, self.parse_entries, body)
            for kind, positions, images in groups:
                outputs = await self._embed_batched(kind, images)
                for position, embedding in zip(positions, outputs["embedding"]):
                    entries[position]["embedding"] = embedding
            added = await loop.run_in_executor(self.gallery_pool, self._store_call,
                                               self.gallery.add,
                                               entries)
            return {"added": added}
        options = self.search_options(body) if method == "search" else None
        if method == "search" and isinstance(body, dict) and "embeddings" in body:
            outputs = {"embedding": await loop.run_in_executor(
                self.pool, self._query_embeddings, body["embeddings"])}
        else:
            kind, images = await loop.run_in_executor(self.pool, parse_images, body,
                                                      self.max_batch, self.max_image_pixels)
            outputs = await self._embed_batched(kind, images)
        if method == "search":
            results, incomplete = await loop.run_in_executor(
                self.gallery_pool, lambda: self.gallery.search(outputs["embedding"], report=True,
                                                       **options))
            for matches in results:
                for match in matches:
                    match["file_name"] = match["id"]  # the name of the earlier API
            answer = {"results": results}
            if any(incomplete):  # a filter's bounded fetch ran out before k matches
                answer["incomplete"] = incomplete
            return answer
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
                data = decode_b64({"b64": item["b64"]}, field)
                check_encoded_image(data, f"{field}.b64", self.max_image_pixels)
                encoded.append((i, data))
            elif sources == ["image"]:
                image = uint8_image(item["image"], f"{field}.image")
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
