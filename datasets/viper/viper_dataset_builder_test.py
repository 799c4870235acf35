"""viper dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import pytest
import tensorflow_datasets as tfds

from reid_datasets.viper import viper_dataset_builder

pytestmark = pytest.mark.slow  # prepares the dataset (several seconds)


class ViperTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = viper_dataset_builder.Builder
    SPLITS = {"train": 4, "query": 2, "gallery": 2}  # 4 identities: 2 train, 2 test
    BUILDER_CONFIG_NAMES_TO_TEST = ["split0_a2b", "split9_b2a"]

if __name__ == "__main__":
    tfds.testing.test_main()
