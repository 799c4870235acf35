"""market1501 dataset: Market-1501 (Zheng et al., ICCV 2015) from the user's own download."""

import os

from reid_datasets import reid_builder
from reid_tf.data import sources

FOLDER = "Market-1501-v15.09.15"


class Builder(reid_builder.ReidBuilder):
    """Market-1501: 1,501 identities, 6 cameras, 32,668 DPM boxes.

    Splits: train 12,936 images / 751 ids; query 3,368 / 750; gallery 15,913 / 751 ids including
    distractors (person 0). Junk images (person -1) are dropped.
    """

    HOMEPAGE = "https://zheng-lab-anu.github.io/Project/project_reid.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download Market-1501 (Market-1501-v15.09.15.zip) from the authors' page, unzip it, and pass
    the folder that holds `{FOLDER}/` as manual_dir.
    """

    def _parse(self, manual_dir):
        return sources.parse_market_layout(os.path.join(manual_dir, FOLDER), max_person_id=1501,
                                           max_camera_id=6)
