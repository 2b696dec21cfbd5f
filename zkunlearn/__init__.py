"""zkunlearn: verifiable machine unlearning for models on edge devices."""

__version__ = "0.1.0"
__all__ = ["__version__"]
