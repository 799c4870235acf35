"""viper dataset: VIPeR (Gray et al., PETS 2007) with 10 seeded 316/316 splits, both directions."""

import os

import tensorflow_datasets as tfds

from reid_datasets import reid_builder
from reid_tf.data import sources

FOLDER = "VIPeR"


class ViperConfig(tfds.core.BuilderConfig):
    def __init__(self, *, split_index, direction, **kwargs):
        super().__init__(**kwargs)
        self.split_index = split_index
        self.direction = direction


class Builder(reid_builder.ReidBuilder):
    """VIPeR: 632 identities, one image from each of two cameras (cam_a, cam_b).

    Config `split{i}_{a2b|b2a}`: split i of 10 (seeded, 316 training / 316 test identities);
    `a2b` queries camera A against camera B, `b2a` the reverse. Report the mean over all 20.
    """

    IMAGE_FORMAT = "png"
    HOMEPAGE = "https://vision.soe.ucsc.edu/node/178"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Unzip VIPeR and pass the folder holding `{FOLDER}/cam_a` and `{FOLDER}/cam_b` as manual_dir.
    """
    BUILDER_CONFIGS = [
        ViperConfig(name=f"split{i}_{d}", split_index=i, direction=d,
                    description=f"split {i}, {d}")
        for i in range(sources.VIPER_NUM_SPLITS) for d in ("a2b", "b2a")
    ]

    def _parse(self, manual_dir):
        return sources.parse_viper(os.path.join(manual_dir, FOLDER), self.builder_config.split_index,
                                   self.builder_config.direction)
