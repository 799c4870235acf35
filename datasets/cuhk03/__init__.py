"""cuhk03 dataset."""

from reid_datasets.cuhk03.cuhk03_dataset_builder import Builder  # noqa: F401
