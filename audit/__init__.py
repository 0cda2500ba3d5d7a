"""model-audit: explainability audits for PyTorch image classifiers."""

__version__ = "0.1.0"
