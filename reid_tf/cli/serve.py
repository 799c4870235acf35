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

from reid_tf import options  # noqa: E402
from reid_tf.deploy.serving.server import DEFAULT_FAR  # noqa: E402
from reid_tf.deploy.serving.config import ServeConfig  # noqa: E402
from reid_tf.extras import MissingPackage  # noqa: E402


options.define_flags(ServeConfig)


def access_policy(config):
    """The `security.Policy` of the options: the API key (refused in one line when its file is
    unusable), allowed hosts and origins; a bind beyond loopback without a key is refused."""
    from reid_tf.deploy.serving import security

    try:
        api_key = security.load_api_key(config.api_key_file)
    except ValueError as problem:
        fail(str(problem))
    refused = security.bind_refusal(config.host, api_key, config.allow_unauthenticated)
    if refused:
        fail(refused)
    return security.Policy(tuple(h.lower() for h in config.allowed_hosts),
                           tuple(config.allowed_origins), api_key)


def log_requests_to_stdout():
    """aiohttp's access log, one line per request, on stdout."""
    import logging

    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.INFO)
    access.addHandler(logging.StreamHandler(sys.stdout))
    access.propagate = False


def operating_far(decisions, asked=None):
    """The served FAR and the decisions: `--far` as given (ValueError in one line where the
    calibration lacks it or cannot measure it), else `DEFAULT_FAR` or the finest fitted rate
    the calibration supports (said in one line); no decisions where it supports none."""
    from reid_tf.evaluate import calibration

    if decisions is None:
        return DEFAULT_FAR, None
    if asked is not None:
        for kind in calibration.KINDS:
            calibration.threshold(decisions, kind, asked)
        return asked, decisions
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
    from reid_tf.deploy.gallery.seed import open_gallery
    from reid_tf.deploy.gallery.seed import start_error
    from reid_tf.deploy.serving.server import Server

    config = options.checked_from_flags(ServeConfig)
    # Pillow only reads headers here (TensorFlow decodes), and --max_image_pixels is the
    # limit: Pillow's own bomb check would refuse before the size could be reported.
    Image.MAX_IMAGE_PIXELS = None
    policy = access_policy(config)  # who may call, before any work
    runtime.enable_memory_growth()
    try:
        export = runtime.open_runtime(config.export)
        far, decisions = served_decisions(config, export)  # refused before any work
        gallery = None
        if config.wanted:
            gallery = open_gallery(export, config, log=lambda line: print(line, flush=True),
                                   thumbnail_size=config.thumbnail_size)
    except (sqlite3.Error, ValueError, OSError, RuntimeError, MissingPackage) as problem:
        fail(start_error(problem, config.gallery_db))
    server = Server(export, gallery, config, calibration=decisions, far=far)
    serve(config, server, policy)


def served_decisions(config, export):
    """`(far, decisions)`: --calibration's or the export's thresholds, checked against the
    model and the operating point (ValueError in one line), or none (said in one line)."""
    from reid_tf.evaluate import calibration

    decisions = (calibration.load(config.calibration) if config.calibration
                 else export.calibration)
    if decisions is not None:  # fitted for another model: refused before any work
        calibration.check_model(decisions, export.model_id,
                                config.calibration or "the export's calibration.json")
    far, decisions = operating_far(decisions, config.far)
    if decisions is None and config.calibration is None and export.calibration is None:
        print("no calibration: :search answers without match / in_gallery decisions (fit one: "
              "reid-eval --calibrate, or train with --validation_identities)", flush=True)
    return far, decisions


def serve(config, server, policy):
    """Serves until stopped; a port taken or a host not this machine's is refused in one
    line."""
    from reid_tf.deploy.serving.app import make_app
    from reid_tf.deploy.serving.app import serve_forever

    application = make_app(server, int(config.max_body_mb * (1 << 20)), config.timeout_s,
                           ui=not config.no_ui, policy=policy)
    log_requests_to_stdout()
    export, gallery = server.export, server.gallery
    try:
        asyncio.run(serve_forever(
            application, config.host, config.port, config.timeout_s, config.max_connections,
            started=lambda: print(
                f"serving {export.path} as '{config.model_name}' (version {export.version})"
                + (f" with a gallery of {len(gallery)}" if gallery else "")
                + f" on http://{config.host}:{config.port}"
                + ("; gallery changes need the API key" if policy.api_key else ""),
                flush=True)))
    except OSError as problem:  # the port is taken, or the host is not this machine's
        if gallery is not None:
            gallery.close()
        fail(f"--host={config.host} --port={config.port}: {problem.strerror or problem}")


def fail(line):
    print(f"reid-serve: error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)


def run():
    flags.mark_flag_as_required("export")
    app.run(main)


if __name__ == "__main__":
    run()
