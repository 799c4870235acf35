"""reid-export: a workdir's latest checkpoint -> `<export_dir>/<version>/` (TF Serving layout).

    reid-export --workdir=runs/demo                     # -> runs/demo/export/<step>/
    reid-export --workdir=runs/demo --export_dir=/models/reid --version=3
    saved_model_cli show --all --dir runs/demo/export/<step>
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A reid-train workdir; its latest checkpoint is exported.")
flags.DEFINE_string("export_dir", None, "Where `<version>/` goes (default <workdir>/export).")
flags.DEFINE_integer("version", None, "Integer version (default: the checkpoint's step).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from reid_tf.train import workdir as workdir_lib

    tf.get_logger().setLevel("ERROR")
    if FLAGS.version is not None and FLAGS.version < 0:
        raise app.UsageError("--version: expected a non-negative integer.")
    try:
        path, checkpoint = workdir_lib.export_latest(os.path.expanduser(FLAGS.workdir),
                                                     FLAGS.export_dir, FLAGS.version)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"reid-export: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"exported {checkpoint} -> {path}")


def run():
    flags.mark_flag_as_required("workdir")
    app.run(main)


if __name__ == "__main__":
    run()
