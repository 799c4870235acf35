"""`ServeConfig`: every option of reid-serve, each declared once (`options.Option`): the
server's (`ServingOptions`), the gallery's (`GalleryOptions`) and the tool's own; `cli/serve.py`
derives its flags and checks from it."""

import dataclasses

from reid_tf import options
from reid_tf.deploy.gallery.seed import GalleryOptions
from reid_tf.deploy.serving.app import DEFAULT_MAX_CONNECTIONS
from reid_tf.deploy.serving.server import DEFAULT_FAR
from reid_tf.deploy.serving.server import ServingOptions
from reid_tf.options import Option


@dataclasses.dataclass(frozen=True)
class ServeConfig(ServingOptions, GalleryOptions):
    """Every option of reid-serve, each declared once (with the server's and the gallery's)."""

    export: str = options.EXPORT.field()
    host: str = Option("127.0.0.1", "Address to listen on (0.0.0.0: every interface).").field()
    port: int = Option(8501, "Port (TF Serving's REST port is 8501).").field()
    max_body_mb: float = Option(32.0, "Largest request body, MiB.").field()
    timeout_s: float = Option(30.0, "Per-request time limit, seconds.").field()
    max_connections: int = Option(DEFAULT_MAX_CONNECTIONS, "Most open connections; more get "
                                  "503.", minimum=1).field()
    calibration: str = Option(None, "A calibration.json (reid-eval --calibrate) for the "
                              "decisions, instead of the one the export carries.").field()
    far: float = Option(None, "The default operating point: the false-accept rate whose "
                        "calibrated thresholds decide match / in_gallery (one it was fitted "
                        "at, and that its validation set can measure); a request may give its "
                        f"own \"far\". Default: {DEFAULT_FAR:g} where the calibration supports "
                        "it, else the finest fitted rate it does.").field()
    no_ui: bool = Option(False, "Do not serve the search page at /.").field()
    allowed_hosts: tuple = Option((), "Host names (or addresses) clients may call this server "
                                  "by, besides loopback (DNS-rebinding guard); * allows any.",
                                  item=str).field()
    allowed_origins: tuple = Option((), "Other web origins allowed to call it (e.g. "
                                    "https://ops.example.org); every other origin and "
                                    "cross-site request gets 403.", item=str).field()
    api_key_file: str = Option(None, "A file whose first line is the key every gallery change "
                               "(:add, :remove) must carry (Authorization: Bearer <key>); or "
                               "set REID_SERVE_API_KEY. Never logged.").field()
    allow_unauthenticated: bool = Option(False, "Listen beyond loopback (--host) without an "
                                         "API key: anyone who reaches the port may change the "
                                         "gallery.").field()
