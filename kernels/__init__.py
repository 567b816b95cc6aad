"""slimops kernels: one folder per family, each with a paper-like PyTorch `reference.py`
(the oracle every backend is tested against) beside its fast implementations."""
