"""oodlib: post-hoc OOD scores, wrong-prediction risk and explanations for image classifiers.

The science package: PyTorch/NumPy only (no Ray, no MLflow). Conventions:

* every OOD score is an ID-confidence — higher means more in-distribution;
* every wrong-prediction risk is higher = more likely wrong;
* features ``h`` are the penultimate activations (B×D), the head is linear: ``logits = h @ W.T + b``.
"""
__version__ = "0.1.0"
