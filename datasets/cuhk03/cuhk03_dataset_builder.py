"""cuhk03 dataset: CUHK03 (Li et al., CVPR 2014), new protocol (Zhong et al., CVPR 2017)."""

import tensorflow_datasets as tfds

from reid_datasets import reid_builder
from reid_tf.data import sources


class Builder(reid_builder.ReidBuilder):
    """CUHK03, new protocol: 767 training and 700 test identities, two cameras per pair.

    Configs: `labeled` (7,368 train / 1,400 query / 5,328 gallery images) and `detected`
    (7,365 / 1,400 / 5,332). Images come from cuhk-03.mat; the split from the protocol's
    config files. File names follow torchreid (`{pair}_{person:03d}_{view}_{image:02d}.png`).
    """

    IMAGE_FORMAT = "png"
    HOMEPAGE = "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place in manual_dir: `cuhk03_release/cuhk-03.mat` (from the authors) and
    `cuhk03_new_protocol_config_labeled.mat`, `cuhk03_new_protocol_config_detected.mat` (from
    the re-ranking repository of Zhong et al.).
    """
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="labeled", description="hand-labelled boxes"),
        tfds.core.BuilderConfig(name="detected", description="DPM-detected boxes"),
    ]

    def _parse(self, manual_dir):
        return sources.parse_cuhk03(manual_dir, self.builder_config.name)
