"""synthetic_persons dataset."""

from reid_datasets.synthetic_persons.synthetic_persons_dataset_builder import Builder  # noqa: F401
