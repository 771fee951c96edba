"""Evaluation: eval-set specs and loading (``sets``), sample metrics (``metrics``), the resumable runner (``run``).

See docs/evaluation.md. This package imports no backend at import time (config validation uses ``sets``).
"""
