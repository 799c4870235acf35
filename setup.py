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
    # The repository's datasets/ folder installs as `reid_datasets`: never shadow HuggingFace's
    # `datasets` distribution.
    packages=setuptools.find_packages(include=["reid_tf", "reid_tf.*"]) + [
        "reid_datasets" + sub.removeprefix("datasets")
        for sub in setuptools.find_packages(include=["datasets", "datasets.*"])
    ],
    package_dir={"reid_datasets": "datasets"},
    package_data={"reid_tf.deploy.serving": ["ui/*"]},  # reid-serve's search page
    install_requires=[
        "keras>=3.10,<4",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tensorboard" + TENSORFLOW,
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tensorflow-datasets needs it to prepare a dataset, undeclared
        "scikit-learn>=1.5",
        "pillow>=10",
        "scipy>=1.11",  # CUHK03's protocol files (.mat v5)
        "h5py>=3.9",  # CUHK03's cuhk-03.mat (MATLAB v7.3)
        "tqdm>=4.60",  # progress bars
        "numba>=0.60",  # the evaluation kernel (no per-query sort)
        "faiss-cpu>=1.8",  # reid-serve's gallery search
        # reid-serve's HTTP server; 3.14: the keep-alive timer runs from a connection's start,
        # which is what closes a connection whose request head never arrives.
        "aiohttp>=3.14",
        "prometheus_client>=0.20",  # reid-serve's /metrics
        "orjson>=3.9",  # reid-serve's answers (numpy arrays straight to JSON)
    ],
    extras_require={
        "cpu": ["tensorflow-cpu" + TENSORFLOW],
        "gpu": ["tensorflow[and-cuda]" + TENSORFLOW],
        # Deploy formats (reid-export --format, and reid-extract/-eval/-serve on the files):
        # onnx: tf2onnx writes, ONNX Runtime reads; tflite: LiteRT reads (TensorFlow writes).
        "onnx": ["tf2onnx>=1.17", "onnxruntime>=1.20"],
        "tflite": ["ai-edge-litert>=2.0"],
        # OpenVINO IR (reid-export --format=openvino): OpenVINO converts and runs it.
        "openvino": ["openvino>=2025.0", "nncf>=2.14"],
        # The gallery on Milvus (reid-serve --gallery_uri): Milvus Lite embedded, or a server.
        "milvus": ["pymilvus>=2.5", "milvus-lite>=2.5"],
        # reid-extract --runner: extraction as an Apache Beam pipeline (RunInference).
        "beam": ["apache-beam>=2.77"],
        # pytest-xdist: make test runs the suite in 2 processes, a file each; dill: tfds.testing; skimage: chelsea; the deploy formats' parity tests; playwright:
        # the search page's browser tests (driving the OS's chromium); the Milvus and Beam extras;
        # milvus: a standalone Milvus server (2.3.5) the gallery contract suite also runs on.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "dill", "scikit-image>=0.22", "tf2onnx>=1.17", "onnxruntime>=1.20",
                 "ai-edge-litert>=2.0", "playwright>=1.50", "pymilvus>=2.5", "milvus-lite>=2.5",
                 "milvus>=2.3.5", "apache-beam>=2.77", "optuna>=4.5", "openvino>=2025.0", "nncf>=2.14"],
        # experiments/summarize.py --plot; experiments/search.py (the hyper-parameter search).
        "experiments": ["matplotlib>=3.8", "optuna>=4.5"],
    },
    entry_points={
        "console_scripts": [
            "reid-demo=reid_tf.cli.demo:run",
            "reid-train=reid_tf.cli.train:run",
            "reid-eval=reid_tf.cli.eval:run",
            "reid-export=reid_tf.cli.export:run",
            "reid-extract=reid_tf.cli.extract:run",
            "reid-serve=reid_tf.cli.serve:run",
        ],
    },
)
