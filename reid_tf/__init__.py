"""reid-tf: person re-identification with PL-Net (part loss) in TensorFlow/Keras."""

__version__ = "0.1.0"
