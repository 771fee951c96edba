"""Built-in verifiable graders: ``rewards.<name>.score(completion, ground_truth, **fields) -> float | dict``.

``math``, ``gsm8k``, ``countdown``, ``format``, ``code`` and ``reasoning_gym`` (optional dependency). A dict
result has ``"score"`` plus extra numeric metrics (e.g. ``"acc"``). Graders never raise on any completion
string; their running time is bounded from outside by ``rltrain.grading.RewardGrader``, and ``math`` also
bounds its own (``rewards._timebound``) for direct calls. This package imports
only the standard library and the maths / sandbox libraries it needs, never ``rltrain``. Submodules are
imported on demand (``reasoning_gym`` needs its optional package).
"""
