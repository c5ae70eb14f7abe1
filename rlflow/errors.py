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
