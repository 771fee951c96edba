"""What every benchmark report shares: the machine it ran on and how it is printed and saved."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from rltrain.fsutil import atomic_write_text


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on, recorded beside its figures (load average: was it quiet?)."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg": os.getloadavg(),
    }


def emit(text: str, report: dict[str, Any], json_path: str | None) -> int:
    """Print ``text``; write ``report`` to ``json_path`` (if given) atomically. Returns exit status 0."""
    print(text)
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    return 0
