"""Multi-turn environments (docs/environments.md): the interface (``base``), built-ins (``calculator``,
``feedback``), tools and their call formats (``tools``), environment calls in grader processes (``worker``,
``runner``) and the trainer's episode sampler and evaluation (``episodes``). Nothing here imports torch at module
level except ``episodes`` (grader processes import this package)."""
