"""Model-serving gateway with built-in safety nets for versioned ONNX models."""

__version__ = "0.1.0"
