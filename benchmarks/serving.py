"""reid-serve under load on loopback: latency percentiles and requests/s.

Exports a PL-Net (K=4, random initialisation) at --height x --width, writes a gallery of
--gallery_size random unit embeddings, starts reid-serve in a subprocess on 127.0.0.1 and runs the
load test of the suite (`reid_tf.testing.load_test`): --clients concurrent keep-alive clients x
--requests requests, one 128x64 image each, interleaving valid predict (b64 and uint8 arrays) and
search (k=5) requests with malformed ones (bad JSON, bad base64, undecodable image, wrong shape,
float values). Prints p50/p99 latency per kind and overall, requests/s, and any status that was not
the expected one.

    python benchmarks/serving.py [--backbone=mobilenet_v2] [--clients=8] [--requests=200]
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import export as export_lib  # noqa: E402
from reid_tf import features  # noqa: E402
from reid_tf import model as model_lib  # noqa: E402
from reid_tf import testing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "mobilenet_v2", "Backbone of the served network.")
flags.DEFINE_integer("height", 256, "Network input height.")
flags.DEFINE_integer("width", 128, "Network input width.")
flags.DEFINE_integer("clients", 8, "Concurrent clients.")
flags.DEFINE_integer("requests", 200, "Requests per client.")
flags.DEFINE_integer("gallery_size", 10000, "Gallery embeddings in the faiss index.")
flags.DEFINE_integer("threads", 2, "reid-serve --threads.")


def percentiles(seconds):
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)  # SavedModel writing logs at INFO
    with tempfile.TemporaryDirectory() as scratch:
        net = model_lib.PartLossNet(num_classes=751, num_parts=4, backbone=FLAGS.backbone,
                                    image_size=(FLAGS.height, FLAGS.width))
        net.build()
        path = export_lib.export_model(net, os.path.join(scratch, "export"), 1)
        width = net(tf.zeros([1, FLAGS.height, FLAGS.width, 3]))["embedding"].shape[-1]
        rng = np.random.default_rng(0)
        gallery = rng.normal(size=(FLAGS.gallery_size, width)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        gallery_npz = os.path.join(scratch, "gallery.npz")
        features.save_features(gallery_npz, gallery,
                               [f"{i:05d}_c1s1_000000_00.jpg" for i in range(len(gallery))])
        with testing.serve(path, f"--gallery={gallery_npz}",
                           f"--threads={FLAGS.threads}") as client:
            images = rng.integers(0, 256, (16, 128, 64, 3), dtype=np.uint8)
            testing.load_test(client.host, client.port, images, clients=2, requests=8)  # warm-up
            report = testing.load_test(client.host, client.port, images, clients=FLAGS.clients,
                                       requests=FLAGS.requests)
    print(f"machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; reid-serve "
          f"{FLAGS.backbone} {FLAGS.height}x{FLAGS.width} K=4, --threads={FLAGS.threads}, "
          f"gallery {FLAGS.gallery_size} (faiss flat)")
    print(f"{FLAGS.clients} clients x {FLAGS.requests} requests: {report['total']} in "
          f"{report['wall_seconds']:.1f} s = {report['total'] / report['wall_seconds']:.1f} "
          f"requests/s ({report['valid']} valid, {report['malformed']} malformed); "
          f"5xx: {report['server_errors']}; unexpected statuses: {len(report['unexpected'])}")
    for kind, seconds in sorted(report["latencies"].items()):
        print(f"  {kind:15s} n={len(seconds):4d}  {percentiles(seconds)}")
    everything = [s for seconds in report["latencies"].values() for s in seconds]
    print(f"  {'all':15s} n={len(everything):4d}  {percentiles(everything)}")


if __name__ == "__main__":
    app.run(main)
