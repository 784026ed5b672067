"""Where phitune keeps what it downloads or converts: `$PHITUNE_HOME`, default `~/.cache/phitune`."""

import os
from pathlib import Path


def phitune_home() -> Path:
    """The cache root (models); created on first use."""
    home = Path(os.environ.get("PHITUNE_HOME") or Path.home() / ".cache" / "phitune").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
