"""Every deploy format side by side on this CPU, against two anchors.

For the SavedModel and each format file of an export (`reid-export --format=tflite,onnx,
openvino`), the OpenVINO files at each precision hint the CPU has (f32; bf16 where OpenVINO
reports bfloat16 units: AVX512-BF16 or AMX):
- rank-1 and mAP on the test split of the run's dataset, through that file
  (`evaluate.evaluator.evaluate_runtime`, as training's final evaluation), and on the test
  split of `--also_dataset` (e.g. the detected boxes of a model trained on labeled ones);
- single-image latency, p50 and p99 over `--latency_calls` calls (uint8 at the training size);
- throughput at batch 32, best of `--repeats` runs of `--batches` batches;
- file size (the SavedModel: its folder without the other files) and peak RSS.
Each is measured in its own process (`--measure=<path>`), so a peak RSS is that runtime's
alone. The anchor beside them: PyTorch eager on torchvision's MobileNetV2 (features, global
pool) at the same input size, run by `--peer_python` (the PyTorch peer's environment,
experiments/peers/requirements.txt); it has no parts and no accuracy figure, only speed.

    python benchmarks/deploy.py --workdir=runs/cuhk03_pair1_labeled_plnet_s0 \
        [--export=<workdir>/export/<version>] [--peer_python=experiments/peers/.venv/bin/python]

Without --export, the workdir is exported first: the SavedModel, then every format file beside
it (300 calibration and 64 parity images of the training split, as reid-export), with its
parity figures in `benchmark_parity.json`. A file under its parity floor, which reid-export
would refuse, is kept and marked, so what it would cost in rank-1 and mAP is measured.
`--profile` instead times the backbone alone against the whole network, as TensorFlow (a
tf.function), as float32 TFLite and as full-integer int8 TFLite, at batch 32: where the time
of each format goes.
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from reid_tf import testing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished reid-train run (its dataset's test split).")
flags.DEFINE_string("export", None, "Its export with the format files (default: export now).")
flags.DEFINE_string("peer_python", None, "Python of the PyTorch peer's environment (the "
                    "torchvision anchor); none: no anchor row.")
flags.DEFINE_integer("latency_calls", 200, "Single-image calls timed for p50/p99.")
flags.DEFINE_integer("batches", 10, "Batches of 32 per throughput run.")
flags.DEFINE_integer("repeats", 3, "Throughput runs (best kept).")
flags.DEFINE_string("measure", None, "Internal: measure this one export path and print JSON.")
flags.DEFINE_bool("accuracy", True, "Also score the test split through each file.")
flags.DEFINE_bool("profile", False, "Time the backbone alone against the whole network.")
flags.DEFINE_string("also_dataset", None, "Also score each file on this dataset's test split "
                    "(e.g. folder:../shared/data/cuhk03_pair1_detected).")

BATCH = 32
TORCH_ANCHOR = r"""
import json, sys, time, resource
import numpy as np, torch, torchvision
torch.set_num_threads(int(sys.argv[4]))
height, width, calls, batches, repeats = map(int, sys.argv[1:4] + sys.argv[5:7])
net = torchvision.models.mobilenet_v2().features.eval()
def forward(x):
    with torch.inference_mode():
        return net(x).mean((2, 3))
one = torch.rand(1, 3, height, width); batch = torch.rand(32, 3, height, width)
for _ in range(5): forward(one)
times = []
for _ in range(calls):
    start = time.perf_counter(); forward(one); times.append(time.perf_counter() - start)
forward(batch)
best = 0
for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches): forward(batch)
    best = max(best, 32 * batches / (time.perf_counter() - start))
print(json.dumps({"p50_ms": 1e3 * float(np.percentile(times, 50)),
                  "p99_ms": 1e3 * float(np.percentile(times, 99)), "batch32_per_s": best,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def size_bytes(path):
    from reid_tf.deploy import formats

    if os.path.isfile(path):
        return formats.file_bytes(path)
    others = {os.path.join(path, name) for name in ("benchmark_parity.json",
                                                   "benchmark_parity.npz")}
    for name in formats.FILES:
        others.update(formats.get(name).paths(os.path.join(path, name)))
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names
               if os.path.join(root, name) not in others)


def export_every_file(workdir):
    """The workdir's SavedModel and every format file whose packages are installed, each
    compared with the SavedModel on the parity images, none refused; returns the export's
    path (its `benchmark_parity.json`: {file: figures, floor, floor_met}; and
    `benchmark_parity.npz`: the images and the SavedModel's outputs, for each runtime's own
    parity, e.g. OpenVINO at bf16)."""
    import numpy as np

    from reid_tf import extras
    from reid_tf.deploy import export
    from reid_tf.deploy import formats
    from reid_tf.deploy import runtime
    from reid_tf.train import workdir as workdir_lib

    model, _ = workdir_lib.load_trained_model(workdir)
    images = workdir_lib.training_images(workdir_lib.read_config(workdir), model.image_size,
                                         300 + 64)
    calibration, parity_images = workdir_lib.split_images(images, 300, 64)
    path = export.export_model(model, os.path.join(workdir, "export"), int(time.time()))
    reference = runtime.open_runtime(path).predict_images(parity_images)
    figures = {}
    for name in formats.FILES:
        file_format = formats.get(name)
        try:
            formats.files_of([file_format.format])
        except extras.MissingPackage as missing:
            print(f"{name}: not measured ({missing})", flush=True)
            continue
        figures[name] = export.write_format_file(model, path, name, calibration, parity_images,
                                                 reference)["parity_with_saved_model"]
        measure, floor = file_format.parity_floor
        figures[name].update(floor=[measure, floor], floor_met=figures[name][measure] >= floor)
        print(f"wrote {name}: {measure} {figures[name][measure]:.6f} (floor {floor}"
              f"{'' if figures[name]['floor_met'] else ', NOT met: reid-export refuses it'})",
              flush=True)
    with open(os.path.join(path, "benchmark_parity.json"), "w") as f:
        json.dump(figures, f, indent=1)
    np.savez(os.path.join(path, "benchmark_parity.npz"), images=parity_images, **{
        key: reference[key] for key in ("embedding", "part_masks")})
    return path


def best_rate(function, batch):
    function(batch)
    best = 0.0
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.batches):
            function(batch)
        best = max(best, BATCH * FLAGS.batches / (time.perf_counter() - start))
    return best


def measure(path, workdir):
    """One runtime's figures (run in a fresh process)."""
    import numpy as np

    from reid_tf.data import splits as splits_lib
    from reid_tf.deploy import runtime
    from reid_tf.evaluate import evaluator
    from reid_tf.train import workdir as workdir_lib

    export = runtime.open_runtime(path)
    figures = {"file": os.path.basename(path) if os.path.isfile(path) else "SavedModel",
               "bytes": size_bytes(path)}
    if hasattr(export, "inference_precision"):  # OpenVINO: what the CPU runs
        figures["file"] += f" ({export.inference_precision})"
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, *export.image_size, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (BATCH, *export.image_size, 3), dtype=np.uint8)
    for _ in range(5):
        export.predict_images(one)
    times = []
    for _ in range(FLAGS.latency_calls):
        start = time.perf_counter()
        export.predict_images(one)
        times.append(time.perf_counter() - start)
    figures["p50_ms"] = 1e3 * float(np.percentile(times, 50))
    figures["p99_ms"] = 1e3 * float(np.percentile(times, 99))
    figures["batch32_per_s"] = best_rate(export.predict_images, batch)
    if FLAGS.accuracy:
        config = workdir_lib.read_config(workdir)
        for prefix, dataset in (("", config.dataset), ("also_", FLAGS.also_dataset)):
            if dataset is None:
                continue
            splits = splits_lib.load_splits(dataset, data_dir=config.data_dir,
                                            splits=("query", "gallery"), log=lambda line: None)
            results = evaluator.evaluate_runtime(export, splits["query"], splits["gallery"])
            figures.update({f"{prefix}rank1": results["rank1"], f"{prefix}mAP": results["mAP"]})
    reference = os.path.join(os.path.dirname(path) if os.path.isfile(path) else path,
                             "benchmark_parity.npz")
    if os.path.exists(reference):  # this runtime's own, at its precision
        from reid_tf.deploy import formats

        reference = dict(np.load(reference))
        figures["runtime_parity"] = formats.parity(
            reference, export.predict_images(reference["images"]))
    figures["peak_rss_gib"] = testing.peak_rss_gib()
    return figures


def run_measure(path, openvino_precision=None):
    command = [sys.executable, os.path.abspath(__file__), f"--measure={path}",
               f"--workdir={FLAGS.workdir}", f"--latency_calls={FLAGS.latency_calls}",
               f"--batches={FLAGS.batches}", f"--repeats={FLAGS.repeats}",
               f"--accuracy={FLAGS.accuracy}"]
    if FLAGS.also_dataset:
        command.append(f"--also_dataset={FLAGS.also_dataset}")
    environment = dict(os.environ)
    if openvino_precision:
        environment["REID_TF_OPENVINO_PRECISION"] = openvino_precision
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env=environment)
    if result.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def torch_anchor(image_size):
    threads = len(os.sched_getaffinity(0))
    result = subprocess.run(
        [FLAGS.peer_python, "-c", TORCH_ANCHOR, str(image_size[0]), str(image_size[1]),
         str(FLAGS.latency_calls), str(threads), str(FLAGS.batches), str(FLAGS.repeats)],
        capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"the PyTorch anchor failed:\n{result.stderr[-3000:]}")
    return {"file": "torchvision MobileNetV2 (eager)",
            **json.loads(result.stdout.strip().splitlines()[-1])}


def openvino_precisions():
    """The precision hints OpenVINO is measured at: f32, and bf16 where its CPU plugin reports
    bfloat16 units (one line says so when it does not). Empty without OpenVINO."""
    try:
        import openvino
    except ImportError:
        return []
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        print("OpenVINO: this CPU has no bfloat16 units (no AVX512-BF16 or AMX); measured at "
              "f32 only.", flush=True)
        return ["f32"]
    return ["f32", "bf16"]


def profile():
    """Batch-32 images/s of the backbone alone and of the whole network, per runtime."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from reid_tf.deploy import formats
    from reid_tf.train import workdir as workdir_lib

    model, _ = workdir_lib.load_trained_model(FLAGS.workdir, log=lambda line: None)
    calibration = workdir_lib.training_images(workdir_lib.read_config(FLAGS.workdir),
                                              model.image_size, 100, log=lambda line: None)
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, *model.image_size, 3), np.uint8)
    spec = [tf.TensorSpec([None, *model.image_size, 3], tf.uint8, name="images")]
    stages = {
        "backbone": tf.function(lambda images: {"features": model.backbone(
            tf.cast(images, tf.float32), training=False)}, input_signature=spec),
        "whole network": formats.pixel_function(model)}
    print("| stage | TensorFlow img/s | TFLite float32 img/s | TFLite int8 img/s |")
    print("| --- | --- | --- | --- |")
    for stage, function in stages.items():
        rates = [best_rate(function, batch)]
        for quantization in ("float32", "int8"):
            with tempfile.TemporaryDirectory() as folder:
                module = formats.frozen_module(model, function)
                tf.saved_model.save(module, folder, signatures={"serving_default": module.pixels})
                converter = tf.lite.TFLiteConverter.from_saved_model(folder)
                flatbuffer = converter.convert()
                if quantization == "int8":
                    converter.optimizations = [tf.lite.Optimize.DEFAULT]
                    flatbuffer = formats.tflite.full_integer(converter, flatbuffer, calibration)
            runner = formats.require("ai_edge_litert.interpreter").Interpreter(
                model_content=flatbuffer).get_signature_runner("serving_default")
            rates.append(best_rate(lambda images: runner(images=images), batch))
        print(f"| {stage} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |")


def main(argv):
    del argv
    print(testing.cpu_line(), flush=True)  # every figure below depends on it
    if not testing.cpu_facts()["units"].get("avx512_vnni"):
        print("int8: this CPU has no VNNI (int8 dot products); the int8 rows run without it.",
              flush=True)
    if FLAGS.profile:
        profile()
        return
    if FLAGS.measure:
        print(json.dumps(measure(FLAGS.measure, FLAGS.workdir)))
        return
    from reid_tf.deploy import runtime

    path = FLAGS.export or export_every_file(FLAGS.workdir)
    card = json.load(open(os.path.join(path, "model_card.json")))
    measured = os.path.join(path, "benchmark_parity.json")
    parity = (json.load(open(measured)) if os.path.exists(measured) else
              {name: entry["parity_with_saved_model"] for name, entry in card["files"].items()})
    precisions = openvino_precisions()
    rows = [run_measure(path)]
    for name, figures in parity.items():
        for precision in precisions if name.endswith(".xml") else [None]:
            rows.append(run_measure(os.path.join(path, name), precision))
            rows[-1].update(parity=figures)
    if FLAGS.peer_python:
        anchor = torch_anchor(runtime.open_runtime(path).image_size)
        rows.append(anchor)
    base = rows[0]
    print(f"\n{path} ({card['model']['backbone']}, K={card['model']['num_parts']}, "
          f"{card['input']['shape'][1]}x{card['input']['shape'][2]}), "
          f"{len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d')}")
    also = " | also rank-1 | also mAP" if FLAGS.also_dataset else ""
    print(f"| file | cosine mean (this runtime) | rank-1 | mAP{also} | p50 ms | p99 ms | batch-32 img/s | "
          "× SavedModel | MB | peak RSS GiB |")
    print("| --- " * (10 + 2 * bool(also)) + "|")
    for row in rows:
        accuracy = " | ".join(f"{100 * row[key]:.1f}" if key in row else "–" for key in (
            "rank1", "mAP") + (("also_rank1", "also_mAP") if also else ()))
        size = f"{row['bytes'] / 1e6:.1f}" if row.get("bytes") else "–"
        parity = row.get("runtime_parity", row.get("parity"))
        cosine = f"{parity['cosine_mean']:.4f}" if parity and row is not base else (
            "1" if row is base else "–")
        if not row.get("parity", {}).get("floor_met", True):
            cosine += " (under its floor)"
        print(f"| {row['file']} | {cosine} | {accuracy} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | "
              f"{row['batch32_per_s']:.0f} | {row['batch32_per_s'] / base['batch32_per_s']:.2f} "
              f"| {size} | {row['peak_rss_gib']:.2f} |")
    print(json.dumps({"cpu": testing.cpu_facts(), "date": time.strftime("%Y-%m-%d"),
                      "rows": rows}))


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
