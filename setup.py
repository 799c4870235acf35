"""reid-tf: person re-identification with PL-Net (part loss) in TensorFlow/Keras.

TensorFlow itself comes from an extra, so each user gets the right wheel:
    pip install '.[cpu]'   # tensorflow-cpu: CPU-only machines, CI (small download)
    pip install '.[gpu]'   # tensorflow[and-cuda]: Linux with an NVIDIA GPU (CUDA libraries from pip)
A plain `pip install .` leaves TensorFlow as it is (for a TensorFlow you built or installed yourself).
"""

import setuptools

TENSORFLOW = "~=2.21.0"

setuptools.setup(
    name="reid-tf",
    version="0.1.0",
    description="Person re-identification with PL-Net (part loss) in TensorFlow/Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["reid_tf", "reid_tf.*"]),
    install_requires=[
        "keras>=3.10,<4",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tensorboard" + TENSORFLOW,
        "tensorflow-datasets>=4.9.8",
        "scikit-learn>=1.5",
        "pillow>=10",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu" + TENSORFLOW],
        "gpu": ["tensorflow[and-cuda]" + TENSORFLOW],
        "test": ["pytest>=8"],
    },
    entry_points={
        "console_scripts": [
            "reid-demo=reid_tf.demo:run",
        ],
    },
)
