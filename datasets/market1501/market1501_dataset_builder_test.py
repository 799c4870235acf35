"""market1501 dataset: TFDS builder test on dummy_data (see datasets/make_dummy_data.py)."""

import tensorflow_datasets as tfds

from reid_datasets.market1501 import market1501_dataset_builder


class Market1501Test(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = market1501_dataset_builder.Builder
    SPLITS = {"train": 6, "query": 2, "gallery": 3}  # junk (-1) dropped, distractor kept


if __name__ == "__main__":
    tfds.testing.test_main()
