"""reid-serve: an HTTP server for an export, with TF Serving's REST API and gallery search.

    reid-serve --export=runs/demo/export/1140 --port=8501 --gallery=gallery.npz
    reid-serve --export=runs/demo/export/1140 --gallery_images=../shared/data/x/bounding_box_test

Endpoints (`<name>` is --model_name; `/versions/<v>` may follow it, as in TF Serving):
- `GET  /v1/models/<name>`: model status; `GET /v1/models/<name>/metadata`: signatures.
- `POST /v1/models/<name>:predict`: `{"instances": [...]}` (or `{"inputs": [...]}`), each image
  `{"b64": "<JPEG/PNG base64>"}` or a nested uint8 array `[H][W][3]`; returns
  `{"predictions": [{"embedding": [...], "global_embedding": ..., ...}, ...]}`
  (`{"outputs": {...}}` for `inputs`), as TensorFlow Serving does.
- `POST /v1/models/<name>:search`: the same images (or `"embeddings"`, or gallery
  `"entry_ids"`) plus `"k"` (default 10), `"exclude_camera"`, `"time_range"`; returns
  `{"results": [[{"id", "person_id", "camera_id", "timestamp", "metadata", "thumbnail",
  "distance", "match", "p_same"}, ...], ...], "in_gallery": [...], "operating_point": {...}}`,
  nearest first, distance = 1 - cosine similarity. `match`/`in_gallery` are the decisions at
  the export's calibrated open-set threshold for --far (or the request's `"far"`); without a
  calibration they are left out. `:verify` takes two images (or embeddings): `{"distance",
  "match", "p_same", "operating_point"}` at the pair threshold. `:add` and `:remove` change the
  live gallery; `:add` from images stores a thumbnail with each entry.
- `GET /v1/models/<name>/gallery` (size, cameras, time span, index state, operating points),
  `/gallery/entries?offset=&limit=`, `/gallery/thumbnails/<id>` (JPEG).
- `GET /`: the search page (--no_ui turns it off).

Bad requests get 400 (413 for a body over --max_body_mb) with `{"error": ..., "field": ...}`;
a request over --timeout_s gets 504. The server never stops on a bad request.
"""

import asyncio
import os
import sqlite3
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from reid_tf.extras import MissingPackage  # noqa: E402

from reid_tf import options  # noqa: E402
from reid_tf.deploy.gallery.thumbnails import DEFAULT_HEIGHT as DEFAULT_THUMBNAIL_HEIGHT  # noqa: E402,E501
from reid_tf.deploy.serving.app import DEFAULT_MAX_CONNECTIONS  # noqa: E402
from reid_tf.deploy.serving.requests import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from reid_tf.deploy.gallery.contract import EntryLimits  # noqa: E402
from reid_tf.deploy.serving.server import DEFAULT_FAR  # noqa: E402

DEFAULT_LIMITS = EntryLimits()

FLAGS = flags.FLAGS
options.define("export", str, options.EXPORT)
flags.DEFINE_string("model_name", "reid", "The <name> of /v1/models/<name>.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8501, "Port (TF Serving's REST port is 8501).")
flags.DEFINE_string("gallery_db", None, "The live gallery's SQLite file (created if missing; "
                    "the source of truth, survives restarts). Without it the gallery lives "
                    "in memory only.")
flags.DEFINE_string("gallery_uri", None, "Another gallery backend: milvus:PATH (Milvus Lite, "
                    "embedded, one local file), http://host:19530 (a Milvus server or cluster), "
                    "or sqlite:PATH (= --gallery_db). Needs pip install 'reid-tf[milvus]' for "
                    "Milvus.")
flags.DEFINE_enum("milvus_index", "FLAT", ["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"], "The Milvus "
                  "gallery's vector index (with --nlist, --nprobe, --ef_search), set when its "
                  "collection is created.")
flags.DEFINE_string("milvus_collection", "reid_gallery", "The Milvus collection.")
flags.DEFINE_string("milvus_token", "", "A Milvus server's credentials (user:password or an "
                    "API key).")
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
flags.DEFINE_string("calibration", None, "A calibration.json (reid-eval --calibrate) for the "
                    "decisions, instead of the one the export carries.")
flags.DEFINE_float("far", None, "The default operating point: the false-accept rate whose "
                   "calibrated thresholds decide match / in_gallery (one it was fitted at, and "
                   "that its validation set can measure); a request may give its own \"far\". "
                   f"Default: {DEFAULT_FAR:g} where the calibration supports it, else the finest "
                   "fitted rate it does.")
flags.DEFINE_integer("thumbnail_size", DEFAULT_THUMBNAIL_HEIGHT, "Height in pixels of the "
                     "thumbnail stored with each entry added from an image (0: none).",
                     lower_bound=0)
flags.DEFINE_bool("no_ui", False, "Do not serve the search page at /.")
flags.DEFINE_list("allowed_hosts", [], "Host names (or addresses) clients may call this server "
                  "by, besides loopback (DNS-rebinding guard); * allows any.")
flags.DEFINE_list("allowed_origins", [], "Other web origins allowed to call it (e.g. "
                  "https://ops.example.org); every other origin and cross-site request gets 403.")
flags.DEFINE_string("api_key_file", None, "A file whose first line is the key every gallery "
                    "change (:add, :remove) must carry (Authorization: Bearer <key>); or set "
                    "REID_SERVE_API_KEY. Never logged.")
flags.DEFINE_bool("allow_unauthenticated", False, "Listen beyond loopback (--host) without an "
                  "API key: anyone who reaches the port may change the gallery.")
flags.DEFINE_integer("max_metadata_bytes", DEFAULT_LIMITS.max_metadata_bytes, "Largest "
                     "metadata of one :add entry, bytes of JSON.", lower_bound=2)
flags.DEFINE_integer("max_metadata_depth", DEFAULT_LIMITS.max_metadata_depth, "Deepest "
                     "nesting of an entry's metadata (objects and lists).", lower_bound=1)


def access_policy():
    """The `security.Policy` of the flags: the API key (refused in one line when its file is
    unusable), allowed hosts and origins; a bind beyond loopback without a key is refused."""
    from reid_tf.deploy.serving import security

    try:
        api_key = security.load_api_key(FLAGS.api_key_file)
    except ValueError as problem:
        fail(str(problem))
    refused = security.bind_refusal(FLAGS.host, api_key, FLAGS.allow_unauthenticated)
    if refused:
        fail(refused)
    return security.Policy(tuple(h.lower() for h in FLAGS.allowed_hosts),
                           tuple(FLAGS.allowed_origins), api_key)


def log_requests_to_stdout():
    """aiohttp's access log, one line per request, on stdout."""
    import logging

    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.INFO)
    access.addHandler(logging.StreamHandler(sys.stdout))
    access.propagate = False


def operating_far(decisions):
    """The served FAR and the decisions: `--far` as given (ValueError in one line where the
    calibration lacks it or cannot measure it), else `DEFAULT_FAR` or the finest fitted rate
    the calibration supports (said in one line); no decisions where it supports none."""
    from reid_tf.evaluate import calibration

    if decisions is None:
        return DEFAULT_FAR, None
    if FLAGS.far is not None:
        for kind in calibration.KINDS:
            calibration.threshold(decisions, kind, FLAGS.far)
        return FLAGS.far, decisions
    far = calibration.default_far(decisions, DEFAULT_FAR)
    if far is None:
        print("the calibration's validation set measures none of its FARs: answering without "
              "match / in_gallery decisions (calibrate on more identities)", flush=True)
        return DEFAULT_FAR, None
    if far != DEFAULT_FAR:
        queries = decisions.get("measured_on", {}).get("stranger_queries")
        print(f"decisions at FAR {far:g}: the finest the calibration supports ({queries} "
              f"validation queries cannot measure {DEFAULT_FAR:g})", flush=True)
    return far, decisions


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from PIL import Image

    from reid_tf.deploy import runtime
    from reid_tf.deploy.gallery.seed import index_spec
    from reid_tf.deploy.gallery.seed import open_gallery
    from reid_tf.deploy.gallery.seed import start_error
    from reid_tf.deploy.serving.app import make_app
    from reid_tf.deploy.serving.app import serve_forever
    from reid_tf.deploy.serving.server import Server
    from reid_tf.evaluate import calibration

    for name in ("max_batch", "max_image_pixels", "max_connections", "threads",
                 "max_batch_size", "max_enqueued_batches"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name}: expected a positive integer.")
    # Pillow only reads headers here (TensorFlow decodes), and --max_image_pixels is the
    # limit: Pillow's own bomb check would refuse before the size could be reported.
    Image.MAX_IMAGE_PIXELS = None
    policy = access_policy()  # who may call, before any work
    api_key = policy.api_key
    runtime.enable_memory_growth()
    try:
        export = runtime.open_runtime(FLAGS.export)
        decisions = (calibration.load(FLAGS.calibration) if FLAGS.calibration
                     else export.calibration)
        if decisions is not None:  # fitted for another model: refused before any work
            calibration.check_model(decisions, export.model_id,
                                    FLAGS.calibration or "the export's calibration.json")
        far, decisions = operating_far(decisions)  # refused before any work
        gallery = None
        if FLAGS.gallery_db or FLAGS.gallery_uri or FLAGS.gallery or FLAGS.gallery_images:
            gallery = open_gallery(
                export, FLAGS.gallery_db, FLAGS.gallery, FLAGS.gallery_images,
                index_spec(FLAGS.index, FLAGS.nlist), FLAGS.nprobe,
                FLAGS.ef_search, FLAGS.persist_every,
                log=lambda line: print(line, flush=True), thumbnail_size=FLAGS.thumbnail_size,
                uri=FLAGS.gallery_uri,
                milvus={"index": FLAGS.milvus_index, "nlist": FLAGS.nlist,
                        "collection": FLAGS.milvus_collection, "token": FLAGS.milvus_token})
    except (sqlite3.Error, ValueError, OSError, RuntimeError, MissingPackage) as problem:
        fail(start_error(problem, FLAGS.gallery_db))
    if decisions is None and FLAGS.calibration is None and export.calibration is None:
        print("no calibration: :search answers without match / in_gallery decisions (fit one: "
              "reid-eval --calibrate, or train with --validation_identities)", flush=True)
    server = Server(export, gallery, FLAGS.model_name, FLAGS.max_batch, FLAGS.threads,
                    FLAGS.max_image_pixels, FLAGS.max_batch_size,
                    FLAGS.batch_timeout_ms, FLAGS.max_enqueued_batches,
                    calibration=decisions, far=far, thumbnail_size=FLAGS.thumbnail_size,
                    limits=EntryLimits(FLAGS.max_metadata_bytes, FLAGS.max_metadata_depth))
    application = make_app(server, int(FLAGS.max_body_mb * (1 << 20)), FLAGS.timeout_s,
                           ui=not FLAGS.no_ui, policy=policy)
    log_requests_to_stdout()
    try:
        asyncio.run(serve_forever(
            application, FLAGS.host, FLAGS.port, FLAGS.timeout_s, FLAGS.max_connections,
            started=lambda: print(
                f"serving {export.path} as '{FLAGS.model_name}' (version {export.version})"
                + (f" with a gallery of {len(gallery)}" if gallery else "")
                + f" on http://{FLAGS.host}:{FLAGS.port}"
                + ("; gallery changes need the API key" if api_key else ""), flush=True)))
    except OSError as problem:  # the port is taken, or the host is not this machine's
        if gallery is not None:
            gallery.close()
        fail(f"--host={FLAGS.host} --port={FLAGS.port}: {problem.strerror or problem}")


def fail(line):
    print(f"reid-serve: error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)


def run():
    flags.mark_flag_as_required("export")
    app.run(main)


if __name__ == "__main__":
    run()
