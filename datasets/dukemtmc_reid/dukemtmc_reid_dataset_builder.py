"""dukemtmc_reid dataset: DukeMTMC-reID (Zheng et al., ICCV 2017) from the user's own copy."""

import os

from reid_datasets import reid_builder
from reid_tf.data import sources

FOLDER = "DukeMTMC-reID"


class Builder(reid_builder.ReidBuilder):
    """DukeMTMC-reID: 1,404 identities plus 408 distractor identities, 8 cameras.

    Splits: train 16,522 images / 702 ids; query 2,228 / 702; gallery 17,661 / 1,110 ids.
    File names `0001_c2_f0046182.jpg` (person, camera, frame).
    """

    HOMEPAGE = "https://github.com/layumi/DukeMTMC-reID_evaluation"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Place the unzipped `{FOLDER}/` folder (bounding_box_train, query, bounding_box_test) in
    manual_dir. The dataset is no longer distributed by its authors; use your existing copy.
    """

    def _parse(self, manual_dir):
        return sources.parse_market_layout(os.path.join(manual_dir, FOLDER), max_camera_id=8)
