"""msmt17 dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import tensorflow_datasets as tfds

from reid_datasets.msmt17 import msmt17_dataset_builder


class Msmt17Test(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = msmt17_dataset_builder.Builder
    SPLITS = {"train": 3, "query": 1, "gallery": 2}  # train = list_train + list_val


if __name__ == "__main__":
    tfds.testing.test_main()
