"""The error a bad setting raises, and the one check that raises it.

Every config dataclass checks its own fields in a ``check(at)`` method written right below its
declaration (``roles/config.py``, ``sync/config.py``, ``engines/config.py``, ``flow/config.py``);
``at`` is where the config sits in the run's settings (``actor``, ``rollout.sglang``), so a message
names the key exactly as a user types it on the command line, and then says the fix. Only rules that
tie two components together live in ``flow/config.RunConfig.check``. Torch-free, like every config
module: the launcher checks a run without importing torch.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting; the message names the key and the fix."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def require_counts(cfg, at: str, *names: str) -> None:
    """Each field ``names`` of ``cfg`` is a count: at least 1."""
    for name in names:
        require(getattr(cfg, name) >= 1, f"{at}.{name}", f"must be >= 1, got {getattr(cfg, name)}")


def require_seconds(cfg, at: str, *names: str) -> None:
    """Each field ``names`` of ``cfg`` is a duration: more than 0 seconds."""
    for name in names:
        require(getattr(cfg, name) > 0, f"{at}.{name}", f"must be > 0 seconds, got {getattr(cfg, name)}")
