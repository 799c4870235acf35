"""Extraction on Apache Beam: a folder or glob of any size -> sharded Parquet of embeddings.

    reid-extract --runner=DirectRunner --export=runs/demo/export/900 --images=/data/cams \
        --output=features/ -- --direct_num_workers=2 --direct_running_mode=multi_processing

The pipeline: match the files (Beam's `MatchFiles`, so any filesystem Beam reads: local, GCS,
S3, HDFS) -> read each file and check that it decodes, with the same decoder as the export
(`evaluate.extract.first_undecodable`); a file that does not goes to the dead-letter output with
its path and the reason -> `RunInference` with `ExportModelHandler` (batches of encoded images
through the export's own decoding and resizing: the SavedModel's `serve_encoded`, or an ONNX or
TFLite file through `deploy.runtime.open_runtime`) -> rows `(id, file_name, person_id,
camera_id, embedding)` -> `<output>/part-SSSSS-of-NNNNN.parquet`, and
`<output>/dead_letter-SSSSS-of-NNNNN.jsonl` (`{"path", "reason"}` per line).

Why not Beam's `TFModelHandlerTensor`: its module imports `tensorflow_hub`, which needs
`tf_keras`, which installs the full `tensorflow` wheel beside `tensorflow-cpu` (two
TensorFlows in one environment). `ExportModelHandler` is a plain `ModelHandler`, so Beam still
batches (`min_batch_size`/`max_batch_size`), shares nothing across bundles but the loaded model,
and reports its metrics as usual.

Exactly once: a row's `id` is its file name (relative to the folder: unique), shards are renamed
into place only when complete (Beam's file sinks), and after a successful run every shard of an
earlier run with another shard count is removed; re-running over the same input rewrites the
same rows, never adds to them. The output folder's `MANIFEST` lists the shards reid-extract
wrote there: a folder holding shards it did not write is refused, never cleaned.

Before the pipeline starts, in one line each: an export that does not open, a pattern that
matches no image, and such an output folder. A failed run removes the `beam-temp-*` folders
Beam's sinks left in the output.
"""

import fnmatch
import glob as glob_lib
import json
import os

from reid_tf.data import sources
from reid_tf.extras import require

PARQUET_PREFIX = "part"
MANIFEST = "_reid_extract_shards.json"  # the shards reid-extract wrote in the output folder
DEAD_LETTER_PREFIX = "dead_letter"
DEAD_LETTER = "dead_letter"  # the tagged output's name


def input_pattern(images, split="gallery"):
    """`(pattern, root)`: the files a run reads, and the folder their names are relative to.

    A Market layout root reads its `split` folder; any other folder every image under it
    (recursively); anything else is taken as a glob (`/data/cams/*/*.jpg`, `gs://bucket/x/*`).
    The rows are the ones single-process reid-extract gives for the same `--images`.
    """
    images = os.path.expanduser(images)
    if os.path.isdir(images):
        market = os.path.join(images, sources.MARKET_LAYOUT[split])
        if os.path.isdir(os.path.join(images, sources.MARKET_LAYOUT["gallery"])):
            return os.path.join(market, "*"), market
        return os.path.join(images, "**"), images
    if not glob_lib.has_magic(images):
        raise ValueError(f"--images={images}: neither a folder nor a glob pattern.")
    root = images
    while glob_lib.has_magic(root):
        root = os.path.dirname(root)
    return images, root


def is_image(path):
    return path.lower().endswith(sources.IMAGE_EXTENSIONS)


def row_labels(file_name):
    """(person_id, camera_id) from a Market-style name; (-1, -1) when it carries none (as
    `data.splits.folder_split`)."""
    match = sources.MARKET_PATTERN.match(os.path.basename(file_name))
    return (int(match.group(1)), int(match.group(2))) if match else (-1, -1)


def _model_handler_class():
    base = require("apache_beam.ml.inference.base")

    class ExportModelHandler(base.ModelHandler):
        """RunInference over a reid-tf export: batches of encoded images -> embeddings.

        Args:
            export: a SavedModel version folder, a `.onnx` or a `.tflite` file.
            batch_size: the largest batch Beam forms (and the smallest, at the start of a
                bundle, 1).
        """

        def __init__(self, export, batch_size=64):
            super().__init__(min_batch_size=1, max_batch_size=batch_size)
            self.export = export

        def load_model(self):
            from reid_tf.deploy import runtime
            return runtime.open_runtime(self.export)

        def run_inference(self, batch, model, inference_args=None):
            import numpy as np
            import tensorflow as tf
            embeddings = model.embed_encoded(tf.constant(list(batch)), ["embedding"])
            return [base.PredictionResult(data, embedding) for data, embedding in
                    zip(batch, np.asarray(embeddings["embedding"], np.float32))]

        def get_num_bytes(self, batch):
            return sum(len(data) for data in batch)

        def get_metrics_namespace(self):
            return "reid_tf_extract"

    return ExportModelHandler


def parquet_schema(pyarrow):
    return pyarrow.schema([
        ("id", pyarrow.string()), ("file_name", pyarrow.string()),
        ("person_id", pyarrow.int64()), ("camera_id", pyarrow.int64()),
        ("embedding", pyarrow.list_(pyarrow.float32())),
    ])


def run(export, images, output, split="gallery", batch_size=64, num_shards=0,
        pipeline_args=(), log=print):
    """Runs the extraction pipeline; returns `{"rows", "dead_letters", "files"}` counted from
    what it wrote. `pipeline_args` are Beam's own options (`--runner=...`, ...)."""
    beam = require("apache_beam")
    from apache_beam.io import fileio
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import KeyedModelHandler
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions
    import pyarrow

    pattern, root = input_pattern(images, split)
    check_inputs(export, images, pattern)
    handler = KeyedModelHandler(_model_handler_class()(export, batch_size))
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
    check_output(output)
    earlier = set(_temporary_folders(output))
    parquet_prefix = FileSystems.join(output, PARQUET_PREFIX)
    dead_prefix = FileSystems.join(output, DEAD_LETTER_PREFIX)

    class ReadAndCheck(beam.DoFn):
        """A matched file -> (file_name, bytes), or a dead letter naming it and why."""

        def process(self, metadata):
            from reid_tf.evaluate.extract import first_undecodable
            path = metadata.path
            name = os.path.relpath(path, root) if not _is_remote(path) else path[len(root):]
            name = name.lstrip("/")
            try:
                with FileSystems.open(path) as file:
                    data = file.read()
            except Exception as error:  # noqa: BLE001 (any filesystem's error is a dead letter)
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, {"path": path,
                                                             "reason": f"unreadable: {error}"})
                return
            if first_undecodable([data]) is not None:
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, {
                    "path": path, "reason": "not a decodable JPEG/PNG/BMP image"})
                return
            yield name, data

    def to_row(keyed):
        file_name, prediction = keyed
        person_id, camera_id = row_labels(file_name)
        return {"id": file_name, "file_name": file_name, "person_id": person_id,
                "camera_id": camera_id, "embedding": [float(v) for v in prediction.inference]}

    options = PipelineOptions(list(pipeline_args))
    try:
        with beam.Pipeline(options=options) as pipeline:
            files = (pipeline
                     | "Match" >> fileio.MatchFiles(pattern)
                     | "Images" >> beam.Filter(lambda metadata: is_image(metadata.path)))
            read = files | "Read" >> beam.ParDo(ReadAndCheck()).with_outputs(DEAD_LETTER,
                                                                                main="images")
            _ = (read.images
                 | "Embed" >> RunInference(handler)
                 | "Rows" >> beam.Map(to_row)
                 | "Parquet" >> beam.io.WriteToParquet(
                     parquet_prefix, parquet_schema(pyarrow), num_shards=num_shards,
                     file_name_suffix=".parquet"))
            _ = (read[DEAD_LETTER]
                 | "DeadLetterJson" >> beam.Map(lambda letter: json.dumps(letter,
                                                                          sort_keys=True))
                 | "DeadLetter" >> beam.io.WriteToText(dead_prefix, file_name_suffix=".jsonl",
                                                       num_shards=1))
    except BaseException:  # a failed run leaves no temporary folder of its sinks
        left = [path for path in _temporary_folders(output) if path not in earlier]
        if left:
            FileSystems.delete(left)
        raise
    return finish(output, log)


def check_inputs(export, images, pattern):
    """ValueError (one line) before any pipeline: an export that does not open (a local one is
    opened here, as each worker would), a pattern that matches no image file."""
    from apache_beam.io.filesystems import FileSystems

    if not _is_remote(export):
        from reid_tf.deploy import runtime
        try:
            runtime.open_runtime(export)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
    matched = FileSystems.match([pattern])[0].metadata_list
    if not any(is_image(metadata.path) for metadata in matched):
        raise ValueError(f"--images={images}: matches no image file "
                         f"({', '.join(sources.IMAGE_EXTENSIONS)}); nothing to extract.")


def _temporary_folders(output):
    """The `beam-temp-*` folders Beam's file sinks keep in `output` while they write."""
    if not _is_remote(output):
        return sorted(glob_lib.glob(os.path.join(output, "beam-temp-*")))
    from apache_beam.io.filesystems import FileSystems  # an object store lists their files
    matched = FileSystems.match([FileSystems.join(output, "beam-temp-*/*")])[0].metadata_list
    return sorted({metadata.path.rsplit("/", 1)[0] for metadata in matched})


def _listed(output):
    from apache_beam.io.filesystems import FileSystems
    path = FileSystems.join(output, MANIFEST)
    if not FileSystems.exists(path):
        return set()
    with FileSystems.open(path) as file:
        return set(json.loads(file.read().decode())["shards"])


def check_output(output):
    """ValueError (one line) when `output` holds shards (`part-*.parquet`, `dead_letter-*`)
    that reid-extract did not write there: a run removes its earlier shards, never others."""
    listed = _listed(output)
    foreign = sorted(metadata.path.rsplit("/", 1)[-1]
                     for prefix, suffix in ((PARQUET_PREFIX, ".parquet"),
                                            (DEAD_LETTER_PREFIX, ".jsonl"))
                     for shards in _shards(output, prefix, suffix).values()
                     for metadata in shards
                     if metadata.path.rsplit("/", 1)[-1] not in listed)
    if foreign:
        raise ValueError(f"--output={output}: holds {len(foreign)} shard(s) that reid-extract "
                         f"did not write there ({foreign[0]}, ...); a run would replace them. "
                         "Give an empty folder (or one of reid-extract's own).")


def _is_remote(path):
    return "://" in path


def _shards(output, prefix, suffix):
    """The complete shards `<prefix>-SSSSS-of-NNNNN<suffix>` in `output`, by shard count."""
    from apache_beam.io.filesystems import FileSystems
    matched = FileSystems.match([FileSystems.join(output, f"{prefix}-*-of-*{suffix}")])
    by_count = {}
    for metadata in matched[0].metadata_list:
        name = metadata.path.rsplit("/", 1)[-1]
        if fnmatch.fnmatch(name, f"{prefix}-[0-9]*-of-[0-9]*{suffix}"):
            count = name[:-len(suffix)].rsplit("-of-", 1)[1]
            by_count.setdefault(count, []).append(metadata)
    return by_count


def finish(output, log=print):
    """After a successful run: keeps only the newest run's shards (an earlier run may have had
    another shard count) and counts what the output holds."""
    from apache_beam.io.filesystems import FileSystems
    summary, kept = {}, []
    for prefix, suffix, key in ((PARQUET_PREFIX, ".parquet", "rows"),
                                (DEAD_LETTER_PREFIX, ".jsonl", "dead_letters")):
        by_count = _shards(output, prefix, suffix)
        newest = max(by_count.values(), key=lambda shards: max(m.last_updated_in_seconds
                                                               for m in shards), default=[])
        stale = [m.path for shards in by_count.values() if shards is not newest for m in shards]
        if stale:
            FileSystems.delete(stale)
        summary[key] = _count(sorted(m.path for m in newest), suffix)
        kept += [m.path.rsplit("/", 1)[-1] for m in newest]
    with FileSystems.create(FileSystems.join(output, MANIFEST)) as file:
        file.write(json.dumps({"shards": sorted(kept)}, indent=1).encode())
    log(f"wrote {output}: {summary['rows']} rows, {summary['dead_letters']} dead letter(s)")
    return summary


def _count(paths, suffix):
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    total = 0
    for path in paths:
        with open(path) as file:
            total += sum(1 for line in file if line.strip())
    return total


def read_output(output):
    """The Parquet rows of a run as numpy arrays sorted by id (`embeddings`, `ids`,
    `file_names`, `person_ids`, `camera_ids`), and its dead letters (a list of dicts)."""
    import numpy as np
    import pyarrow.parquet as pq
    shards = sorted(glob_lib.glob(os.path.join(output, f"{PARQUET_PREFIX}-*-of-*.parquet")))
    tables = [pq.read_table(path).to_pydict() for path in shards]
    rows = sorted((row for table in tables for row in zip(*(table[k] for k in (
        "id", "file_name", "person_id", "camera_id", "embedding")))), key=lambda r: r[0])
    letters = []
    for path in sorted(glob_lib.glob(os.path.join(output, f"{DEAD_LETTER_PREFIX}-*.jsonl"))):
        with open(path) as file:
            letters += [json.loads(line) for line in file if line.strip()]
    return {"ids": np.array([r[0] for r in rows], dtype=object),
            "file_names": np.array([r[1] for r in rows], dtype=object),
            "person_ids": np.array([r[2] for r in rows], np.int64),
            "camera_ids": np.array([r[3] for r in rows], np.int64),
            "embeddings": np.array([r[4] for r in rows], np.float32).reshape(len(rows), -1),
            }, letters
