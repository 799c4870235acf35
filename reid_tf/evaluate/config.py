"""`EvalConfig` and `ExtractConfig`: every option of reid-eval and of reid-extract, each
declared once (`options.Option`); the tools (`cli/eval.py`, `cli/extract.py`) derive their flags
and checks from them."""

import dataclasses
import os

from reid_tf import options
from reid_tf.data import sources
from reid_tf.evaluate.evaluator import Scoring
from reid_tf.options import Option


@dataclasses.dataclass(frozen=True)
class EvalConfig(Scoring):
    """Every option of reid-eval, each declared once (with `Scoring`'s)."""

    workdir: str = Option(None, "A reid-train workdir: evaluates its latest checkpoint.").field()
    export: str = options.EXPORT.field()
    dataset: str = options.DATASET.replace(default=None,
                                           help="Dataset (default: the workdir's).").field()
    data_dir: str = options.DATA_DIR.field()
    manual_dir: str = options.MANUAL_DIR.field()
    skip_corrupt: bool = options.SKIP_CORRUPT.field()
    image_height: int = options.IMAGE_HEIGHT.replace(
        default=None, help="Input height for an --export that does not record its training "
        "size (exports do since this flag's help says so); else unused.").field()
    image_width: int = options.IMAGE_WIDTH.replace(
        default=None, help="Input width, as --image_height.").field()
    descriptor: str = Option(
        "embedding", "What to rank with: the test descriptor (global + parts), the global "
        "embedding alone, or the part embeddings alone (each L2-normalised, concatenated).",
        choices=("embedding", "global_embedding", "part_embeddings")).field()
    flip: bool = Option(False, "Test-time augmentation: mean of the image's and its mirror's "
                        "embeddings.").field()
    batch_size: int = options.BATCH_SIZE.field()
    plot_ranked: int = Option(0, "Write ranked-list pictures of this many queries.").field()
    output_dir: str = Option(None, "Where results.json and pictures go.").field()
    calibrate: bool = Option(False, "Fit the decision thresholds (match / in gallery at each "
                             "FAR) on identities the model did not train on; writes "
                             "calibration.json.").field()
    calibration_data: str = Option(None, "--calibrate on this labelled dataset's "
                                   "query/gallery (a folder: or TFDS name) instead of "
                                   "validation identities.").field()
    validation_identities: float = Option(
        None, "With --export: --calibrate on this share (or number) of the training "
        "identities, as reid-train carved them (valid only if the export's run held them "
        "out). A workdir uses its own.").field()
    fars: tuple = Option((0.1, 0.01, 0.001), "False-accept rates to fit thresholds at.",
                         item=float).field()
    open_set: bool = Option(False, "Open-set identification on the test split: a third of the "
                            "test identities (seeded) leave the gallery; DIR and FAR at each "
                            "fitted FAR.").field()
    calibration: str = Option(None, "A calibration.json for --open_set and for "
                              "--plot_ranked's match colours (default: the one --calibrate "
                              "fits, or the export's).").field()
    open_set_seed: int = Option(0, "Which identities leave the gallery for "
                                "--open_set.").field()

    @property
    def reading(self):
        """How datasets are read (`splits.load_splits`'s options)."""
        return {"data_dir": self.data_dir, "manual_dir": self.manual_dir,
                "skip_corrupt": self.skip_corrupt}

    @property
    def output_folder(self):
        return self.output_dir or (os.path.join(self.workdir, "eval") if self.workdir
                                   else "reid_eval")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Every option of reid-extract, each declared once."""

    export: str = options.EXPORT.field()
    images: str = Option(None, "A folder of images: a Market layout root (then --split picks "
                         "the sub-folder) or any folder (every image in it, "
                         "recursively).").field()
    dataset: str = options.DATASET.replace(
        default=None, help="Or a TFDS dataset name (synthetic_persons, ...).").field()
    split: str = Option("gallery", "Split of a Market layout or dataset.",
                        choices=tuple(sources.SPLITS)).field()
    data_dir: str = options.DATA_DIR.field()
    output: str = Option("features.npz", "Where features.npz goes; with --runner, the folder "
                         "(or bucket path) of the Parquet shards and dead letters.").field()
    runner: str = Option(None, "Run the extraction as an Apache Beam pipeline on this runner "
                         "(DirectRunner, FlinkRunner, SparkRunner, DataflowRunner; needs "
                         "reid-tf[beam]); Beam's own options follow a `--`. --images may then "
                         "also be a glob.").field()
    num_shards: int = Option(0, "With --runner: Parquet shards (0: the runner "
                             "decides).").field()
    batch_size: int = options.BATCH_SIZE.replace(help="Images per batch.").field()
    skip_corrupt: bool = options.SKIP_CORRUPT.field()
