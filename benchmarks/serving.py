"""reid-serve under load on loopback: latency percentiles and requests/s.

Exports a PL-Net (K=4, random initialisation) at --height x --width, writes a gallery of
--gallery_size random unit embeddings, starts reid-serve in a subprocess on 127.0.0.1 and runs the
load test of the suite (`reid_tf.testing.load_test`): --clients concurrent keep-alive clients x
--requests requests, one 128x64 image each, interleaving valid predict (b64 and uint8 arrays) and
search (k=5) requests with malformed ones (bad JSON, bad base64, undecodable image, wrong shape,
float values). Prints p50/p99 latency per kind and overall, requests/s, and any status that was not
the expected one. Then dynamic batching: --batch clients sending one b64 image each against the
export's own forward pass at batch --batch in this process, and a lone client.

`--rebuild_phase` (issue 24): another reid-serve on an IVF gallery database of
--rebuild_gallery entries; one client's single-image `:predict` latency alone, then while a
second client scrapes `/metrics` without pause and a third `:add`s as many entries again (the
add that passes twice the trained size retrains the index under the store's lock: the rebuild).

    python benchmarks/serving.py [--backbone=mobilenet_v2] [--clients=8] [--requests=200]
    python benchmarks/serving.py --rebuild_phase [--rebuild_gallery=20000]
"""

import os
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from reid_tf import model as model_lib  # noqa: E402
from reid_tf import testing  # noqa: E402
from reid_tf.deploy import export as export_lib  # noqa: E402
from reid_tf.deploy import runtime  # noqa: E402
from reid_tf.evaluate import features_npz  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "mobilenet_v2", "Backbone of the served network.")
flags.DEFINE_integer("height", 256, "Network input height.")
flags.DEFINE_integer("width", 128, "Network input width.")
flags.DEFINE_integer("clients", 8, "Concurrent clients.")
flags.DEFINE_integer("requests", 200, "Requests per client.")
flags.DEFINE_integer("gallery_size", 10000, "Gallery embeddings in the faiss index.")
flags.DEFINE_integer("threads", 2, "reid-serve --threads.")
flags.DEFINE_integer("batch", 16, "Clients of the throughput test, and --max_batch_size.")
flags.DEFINE_float("batch_timeout_ms", 20.0, "reid-serve --batch_timeout_ms.")
flags.DEFINE_integer("throughput_requests", 40, "Requests per client in the throughput test.")
flags.DEFINE_integer("rounds", 3, "Throughput test and forward pass timed in turns this often.")
flags.DEFINE_bool("rebuild_phase", False, ":predict's latency during /metrics scrapes and an "
                  "index rebuild, instead of the load test.")
flags.DEFINE_integer("rebuild_gallery", 20000, "Entries of the rebuild phase's gallery.")


def percentiles(seconds):
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"


def throughput(client, path, images, clients, requests):
    """`clients` threads, each sending `requests` predict requests of one b64 image: images/s
    and latencies."""
    import base64
    import io
    import json
    import threading
    import time

    from PIL import Image

    bodies = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        body = {"instances": [{"b64": base64.b64encode(buffer.getvalue()).decode()}]}
        bodies.append(json.dumps(body).encode())
    status, answer = testing.JsonClient(client.host, client.port).request(
        "POST", "/v1/models/reid:predict", bodies[0])
    assert status == 200 and len(answer["predictions"][0]["embedding"]) > 0, (status, answer)
    latencies, lock = [], threading.Lock()

    def run(number):
        # The clients share this process's two cores with the server: they send prepared bytes
        # and do not parse the answers, so that the figure is the server's.
        connection = testing.JsonClient(client.host, client.port)
        for request in range(requests):
            start = time.perf_counter()
            status, _ = connection.request("POST", "/v1/models/reid:predict",
                                           bodies[(number + request) % len(bodies)], parse=False)
            assert status == 200, status
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * requests / (time.perf_counter() - start), latencies


def batch_sizes(client):
    """(images, model calls) so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(client.raw("/metrics"))
              for s in f.samples}
    return values.get("reid_batch_size_sum", 0.0), values.get("reid_batch_size_count", 0.0)


def forward_rate(export, images, batch, repeats):
    """The export's own serve_encoded at `batch` images per call (PNG bytes), images/s."""
    import io
    import time

    from PIL import Image

    encoded = []
    for image in images[:batch]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    export.predict_encoded(encoded)
    start = time.perf_counter()
    for _ in range(repeats):
        export.predict_encoded(encoded)
    return batch * repeats / (time.perf_counter() - start)


def rebuild_phase(path, width, scratch):
    """:predict latency alone, then during /metrics scrapes and an IVF retrain."""
    rng = np.random.default_rng(1)
    size = FLAGS.rebuild_gallery
    vectors = rng.normal(size=(2 * size + 1, width)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    seed_npz = os.path.join(scratch, "rebuild_seed.npz")
    features_npz.save_features(seed_npz, vectors[:size],
                               [f"{i:06d}_c1s1_000000_00.jpg" for i in range(size)])
    body = {"instances": [rng.integers(0, 256, (128, 64, 3)).tolist()]}
    log = open(os.path.join(scratch, "rebuild_serve.log"), "w+")
    with testing.serve(path, f"--gallery_db={os.path.join(scratch, 'rebuild.sqlite')}",
                       f"--gallery={seed_npz}", "--index=ivf", "--nlist=64",
                       f"--threads={FLAGS.threads}", "--max_body_mb=64", log=log) as client:
        def predict_latencies(until):
            latencies = []
            while not until(latencies):
                start = time.perf_counter()
                status, _ = client.request("POST", "/v1/models/reid:predict", body)
                latencies.append(time.perf_counter() - start)
                assert status == 200, status
            return latencies

        for _ in range(5):
            client.request("POST", "/v1/models/reid:predict", body)  # warm-up
        alone = predict_latencies(lambda latencies: len(latencies) >= 100)
        done = threading.Event()
        scrapes, adds, failures = [], [], []

        def scrape():
            scraper = testing.JsonClient(client.host, client.port)
            while not done.is_set():
                start = time.perf_counter()
                scraper.raw("/metrics")
                scrapes.append(time.perf_counter() - start)

        def add():
            adder = testing.JsonClient(client.host, client.port, timeout=600)
            try:
                for start in range(size, 2 * size + 1, 64):  # reid-serve's --max_batch
                    entries = [{"id": f"new{i}", "embedding": vectors[i].tolist()}
                               for i in range(start, min(start + 64, 2 * size + 1))]
                    began = time.perf_counter()
                    status, answer = adder.request("POST", "/v1/models/reid:add",
                                                   {"entries": entries})
                    adds.append(time.perf_counter() - began)
                    if status != 200:
                        failures.append(answer)
                        return
                time.sleep(1.0)  # a last stretch after the rebuild
            finally:
                done.set()

        threads = [threading.Thread(target=scrape), threading.Thread(target=add)]
        for thread in threads:
            thread.start()
        during = predict_latencies(lambda latencies: done.is_set())
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(f":add failed: {failures[0]}")
        log.seek(0)
        retrained = "retraining" in log.read()
    print(f"rebuild phase: IVF (nlist 64) gallery of {size} x {width}, then {size + 1} more "
          f"added in requests of 64 ({'the index retrained' if retrained else 'NO retrain seen'}"
          f"; the slowest :add, the one that retrained: {max(adds):.2f} s)")
    print(f"  :predict alone              n={len(alone):4d}  {percentiles(alone)}")
    print(f"  :predict during scrapes+add n={len(during):4d}  {percentiles(during)}")
    print(f"  /metrics during the adds    n={len(scrapes):4d}  {percentiles(scrapes)}")


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
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
        if FLAGS.rebuild_phase:
            rebuild_phase(path, width, scratch)
            return
        gallery_npz = os.path.join(scratch, "gallery.npz")
        features_npz.save_features(gallery_npz, gallery,
                               [f"{i:05d}_c1s1_000000_00.jpg" for i in range(len(gallery))])
        images = rng.integers(0, 256, (16, 128, 64, 3), dtype=np.uint8)
        with testing.serve(path, f"--gallery={gallery_npz}", f"--threads={FLAGS.threads}",
                           f"--max_batch_size={FLAGS.batch}",
                           f"--batch_timeout_ms={FLAGS.batch_timeout_ms}") as client:
            testing.load_test(client.host, client.port, images, clients=2, requests=8)  # warm-up
            report = testing.load_test(client.host, client.port, images, clients=FLAGS.clients,
                                       requests=FLAGS.requests)
            # Dynamic batching: 16 clients of one image each against the export's own forward
            # at batch 16, measured in this run; then one lone client.
            # This machine's speed drifts by tens of % from minute to minute, so the two are
            # timed in turns, --rounds times, and the ratio is taken per round.
            export = runtime.SavedModelRuntime(path)
            rounds = []
            for _ in range(FLAGS.rounds):
                forward = forward_rate(export, images, FLAGS.batch, FLAGS.throughput_requests // 2)
                before = batch_sizes(client)
                batched_rate, batched = throughput(client, path, images, FLAGS.batch,
                                                   FLAGS.throughput_requests)
                after = batch_sizes(client)
                mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rounds.append((batched_rate, batched, forward, mean_batch))
            forward_one = forward_rate(export, images, 1, FLAGS.throughput_requests)
            lone_rate, lone = throughput(client, path, images, 1, FLAGS.throughput_requests)
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
    print(f"dynamic batching (--max_batch_size={FLAGS.batch}, --batch_timeout_ms="
          f"{FLAGS.batch_timeout_ms}): {FLAGS.batch} clients x 1 image against the export's own "
          f"forward at batch {FLAGS.batch}, timed in turns:")
    ratios = []
    for number, (batched_rate, batched, forward, mean_batch) in enumerate(rounds, 1):
        p50, p99 = np.percentile(batched, [50, 99])
        ratios.append(batched_rate / forward)
        print(f"  round {number}: {batched_rate:.1f} images/s ({percentiles(batched)}, p99/p50 "
              f"{p99 / p50:.2f}); forward {forward:.1f} images/s; ratio {ratios[-1]:.2f}; mean "
              f"images per model call {mean_batch:.1f}")
    print(f"  median ratio {np.median(ratios):.2f} (rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"one client: {lone_rate:.1f} requests/s ({percentiles(lone)}); the export's forward "
          f"at batch 1: {1000 / forward_one:.1f} ms per image")


if __name__ == "__main__":
    app.run(main)
