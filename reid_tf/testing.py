"""Test helpers shared by the suite and the benchmarks.

Keras layer checks: config round trip; eager, tf.function and XLA give the same outputs.
Training: a few SGD steps of a tiny PL-Net under a strategy (1 device against 2 replicas).
HTTP: a free port, a small JSON client, the load test of reid-serve, and a stream of gallery
adds cut by a SIGKILL. Images: synthetic people to feed a model, PNG in and out. Scripts:
experiments/*.py imported by path.
"""

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from reid_tf.extras import require


def load_script(path):
    """A script that is not part of a package (experiments/*.py), imported from its path so
    that its tests can call its functions; named after its file."""
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The reduced-precision and vector units a CPU timing depends on (Linux /proc/cpuinfo names).
CPU_UNITS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def cpu_facts(cpuinfo="/proc/cpuinfo"):
    """`{"model", "cores", "units": {flag: bool}}` of this machine's CPU, for every benchmark's
    figures (machines here differ: AVX2 only, AVX-512, AMX + VNNI). `cpuinfo`: a path, or the
    text itself (tests)."""
    text = cpuinfo
    if "\n" not in cpuinfo:
        try:
            with open(cpuinfo) as f:
                text = f.read()
        except OSError:
            text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "cores": os.cpu_count(),
            "units": {unit: unit in flags for unit in CPU_UNITS}}


def cpu_line(facts=None):
    """One line naming the CPU and which units it has, e.g. for a benchmark's output."""
    facts = facts or cpu_facts()
    present = [unit for unit, there in facts["units"].items() if there]
    missing = [unit for unit, there in facts["units"].items() if not there]
    return (f"CPU: {facts['model']}, {facts['cores']} cores; has "
            f"{', '.join(present) or 'none of ' + ', '.join(CPU_UNITS)}"
            + (f"; lacks {', '.join(missing)}" if missing and present else ""))



def stamped_output(argv):
    """[(seconds since the process started, line)] of a command's output (stdout and stderr),
    its exit last; raises RuntimeError with the last lines when it fails. For the whole-run
    benchmarks (train_startup.py, train_whole_run.py)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    process.wait()
    lines.append((time.perf_counter() - start, f"exit {process.returncode}"))
    if process.returncode:
        raise RuntimeError("\n".join(line for _, line in lines[-20:]))
    return lines

def peak_rss_gib():
    """This process's peak RSS in GiB: VmHWM, which starts afresh at exec (ru_maxrss would carry
    over a forking parent's peak into a child); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def synthetic_images(count, size=(128, 64), seed=0):
    """`count` rendered synthetic people (`data.synthetic`), uint8 `[count,H,W,3]`."""
    from reid_tf.data import synthetic

    rng = np.random.default_rng(seed)
    return np.stack([synthetic.render_person(synthetic.sample_identity(rng),
                                             synthetic.sample_camera(rng), rng, *size)
                     for _ in range(count)]).astype(np.uint8)


def png(image):
    """A uint8 `[H,W,3]` image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(image):
    """A uint8 `[H,W,3]` image as the base64 PNG of a reid-serve request's `b64`."""
    return base64.b64encode(png(image)).decode()


def decoded(encoded):
    """Encoded images (a split's `images`) as uint8 `[N,H,W,3]` RGB arrays."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                     for data in encoded])


def gallery_adds(count, dim=64, seed=0):
    """`count` entries for reid-serve's `:add`, `id<i>` on camera `i % 4`: every third one an
    image (a random 64x32 PNG), the others a random `dim`-d embedding. Returns `(embeddings,
    pictures, entry)`: the embeddings `[count, dim]`, `{i: base64 PNG}` and `entry(i)`."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(count, dim)).astype(np.float32)
    pictures = {i: b64_png(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8))
                for i in range(0, count, 3)}

    def entry(i):
        source = {"b64": pictures[i]} if i in pictures else {"embedding": embeddings[i].tolist()}
        return {"id": f"id{i}", "camera_id": i % 4, **source}

    return embeddings, pictures, entry


def add_until_killed(client, entry, count, kill_after):
    """Adds `entry(0)`, `entry(1)`, ... to the reid-serve of `client` one request each, while
    another thread SIGKILLs the server at a random moment after `kill_after` acknowledgements.
    Returns `(acknowledged, attempted)`: the indices answered 200, and how many were sent (the
    one in flight at the kill included)."""
    import random
    import signal

    acknowledged, chance, failed = [], random.Random(), threading.Event()

    def kill():
        while len(acknowledged) < kill_after:
            if failed.is_set():  # an add was refused: the test fails, nothing to kill
                return
            time.sleep(0.0005)
        time.sleep(chance.uniform(0, 0.003))
        os.kill(client.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    attempted = 0
    try:
        for i in range(count):
            attempted += 1
            try:
                status, _ = client.request("POST", "/v1/models/reid:add",
                                           {"entries": [entry(i)]})
            except OSError:
                break
            assert status == 200, status
            acknowledged.append(i)
    except BaseException:
        failed.set()
        raise
    finally:
        killer.join()
    return acknowledged, attempted


def train_steps(strategy, initial_weights, batches, sync_batch_norm=False, **step_options):
    """SGD (0.05, momentum 0.9) steps of a tiny PL-Net (K=3, 64x32, D=16, 5 classes) from
    `initial_weights`, one per batch (`{"image", "label"}` of 8), under `strategy`.

    `step_options` go to `train.step.make_train_step` (label smoothing, triplet terms). Returns
    the final weights and each step's metrics (numpy)."""
    import keras

    from reid_tf.model import PartLossNet
    from reid_tf.train import step as step_lib

    with strategy.scope():
        net = PartLossNet(num_classes=5, num_parts=3, backbone="tiny", image_size=(64, 32),
                          embedding_dim=16, sync_batch_norm=sync_batch_norm)
        net.build()
        net.set_weights(initial_weights)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        optimizer.build(net.trainable_variables)
    dataset = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}).unbatch().batch(8)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    step = step_lib.make_train_step(net, optimizer, strategy, global_batch_size=8,
                                    **step_options)
    history = [step(iterator, tf.constant(1)) for _ in batches]
    return net.get_weights(), [{k: np.asarray(v) for k, v in m.items()} for m in history]


def check_config_round_trip(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    return clone


def check_call_modes(layer, inputs, atol=1e-5):
    """Runs `layer` eagerly, inside tf.function and with jit_compile; returns the eager output."""
    eager = layer(inputs)
    graph = tf.function(lambda x: layer(x))(inputs)
    xla = tf.function(lambda x: layer(x), jit_compile=True)(inputs)
    for other in (graph, xla):
        np.testing.assert_allclose(np.asarray(other), np.asarray(eager), atol=atol)
    return eager


def hide_package(monkeypatch, package):
    """Makes `extras.require` find `package` missing (as if not installed) for one test."""
    from reid_tf import extras

    real_import = extras.importlib.import_module

    def without(module):
        if module.split(".")[0] == package:
            raise ImportError(f"No module named {package!r}")
        return real_import(module)

    monkeypatch.setattr(extras.importlib, "import_module", without)


def run_module(module, *flags, check=True, timeout=600):
    """`python -m module *flags` on the CPU, its output captured; with `check`, a failure
    asserts with the end of its stderr. (Tests never import a `reid_tf.cli` module: absl's flags
    are process-wide.)"""
    result = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True,
                            text=True, timeout=timeout,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@contextlib.contextmanager
def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


@contextlib.contextmanager
def serve(export, *flags, log=subprocess.DEVNULL, start_timeout=180):
    """reid-serve on a free loopback port in a subprocess; yields a `JsonClient` once the model
    answers, and stops the server after. `log` takes its output: a file or DEVNULL, never a pipe
    nobody reads (the access log would fill it and block the server)."""
    with free_port() as port:
        pass
    process = subprocess.Popen(
        [sys.executable, "-m", "reid_tf.cli.serve", f"--export={export}", f"--port={port}",
         *flags], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        client = JsonClient("127.0.0.1", port)
        client.pid = process.pid  # for tests that read the server's memory
        deadline = time.time() + start_timeout
        while True:
            try:
                client.request("GET", "/v1/models/reid")
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"reid-serve did not start (exit status "
                                       f"{process.poll()})") from None
                time.sleep(0.5)
        yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def milvus_server(base_dir):
    """A standalone Milvus server (the `milvus` package's, 2.3.5: `pip install milvus`) with its
    data under `base_dir`, on free loopback ports; yields its `http://127.0.0.1:port` URI and
    stops it after. MissingPackage when the package is not installed; RuntimeError, with the
    end of the server's log, when it does not start."""
    server_package = require("milvus")
    server = server_package.MilvusServer()
    server.set_base_dir(str(base_dir))
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError, OSError) as problem:
            log = os.path.join(str(base_dir), "logs", "milvus-stderr.log")
            tail = open(log, encoding="utf-8", errors="replace").read()[-600:] \
                if os.path.exists(log) else ""
            raise RuntimeError(f"the Milvus server did not start ({problem}): {tail}") from None
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


class JsonClient:
    """A small keep-alive HTTP client: `request(method, path, body)` -> (status, JSON answer).

    `body` is a JSON-able value, or bytes sent as they are. With `parse=False` the answer is
    returned as bytes (a load generator then spends no CPU on parsing it).
    """

    def __init__(self, host, port, timeout=120):
        self.host, self.port, self.timeout = host, port, timeout
        self.connection = None

    def raw(self, path):
        """The body of GET `path` as text (e.g. /metrics)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def request(self, method, path, body=None, parse=True, headers=None):
        """`headers` are added to (or replace) the JSON Content-Type, e.g. a key or a Host."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port,
                                                             timeout=self.timeout)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
            self.connection = None
        if not parse:
            return response.status, data
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {"raw": data[:200].decode(errors="replace")}


def _load_test_requests(images):
    """The mix of a load test: (kind, path, body, expected status, image index or None)."""
    def b64(image):
        return base64.b64encode(tf.io.encode_png(image).numpy()).decode()

    predict, search = "/v1/models/reid:predict", "/v1/models/reid:search"
    mix = []
    for index, image in enumerate(images):
        mix += [
            ("predict_b64", predict, {"instances": [{"b64": b64(image)}]}, 200, index),
            ("predict_array", predict, {"instances": [image.tolist()]}, 200, index),
            ("search", search, {"k": 5, "instances": [{"b64": b64(image)}]}, 200, None),
            ("malformed_json", predict, b'{"instances": [', 400, None),
            ("bad_base64", predict, {"instances": [{"b64": "!!" + b64(image)[2:]}]}, 400, None),
            ("undecodable", predict, {"instances": [{"b64": b64(image)[:40]}]}, 400, None),
            ("wrong_shape", predict, {"instances": [image[..., :2].tolist()]}, 400, None),
            ("float_values", predict, {"instances": [(image / 255).tolist()]}, 400, None),
        ]
    return mix


def load_test(host, port, images, clients=8, requests=200):
    """`clients` threads each sending `requests` requests (valid and malformed, interleaved).

    Returns counts, the requests whose status was not the expected one (`unexpected`), the
    `(image index, embedding)` of every valid predict answer (to check nothing was mixed up),
    and latencies in seconds per kind.
    """
    mix = _load_test_requests(np.asarray(images, np.uint8))
    encoded = [(kind, path, json.dumps(body).encode() if not isinstance(body, bytes) else body,
                status, index) for kind, path, body, status, index in mix]
    lock = threading.Lock()
    report = {"total": 0, "valid": 0, "malformed": 0, "server_errors": 0, "unexpected": [],
              "embeddings": [], "latencies": {}}

    def client(number):
        connection = JsonClient(host, port)
        for request in range(requests):
            kind, path, body, expected, index = encoded[(number * 7 + request * 3) % len(encoded)]
            start = time.perf_counter()
            try:
                status, answer = connection.request("POST", path, body)
            except OSError as error:
                status, answer = None, {"error": repr(error)}
            elapsed = time.perf_counter() - start
            with lock:
                report["total"] += 1
                report["valid" if expected == 200 else "malformed"] += 1
                report["latencies"].setdefault(kind, []).append(elapsed)
                if status is None or status >= 500:
                    report["server_errors"] += 1
                if status != expected:
                    report["unexpected"].append((kind, status, str(answer)[:200]))
                elif index is not None:
                    report["embeddings"].append(
                        (index, np.asarray(answer["predictions"][0]["embedding"], np.float32)))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report["wall_seconds"] = time.perf_counter() - start
    return report
