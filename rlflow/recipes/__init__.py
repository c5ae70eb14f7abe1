"""Hydra recipes: ``default.yaml`` (what ``rlflow`` runs) and the others, chosen with ``rlflow -cn NAME``.

A recipe only sets fields of the structured config in ``flow/config.py``; it never adds new ones.
"""


def names() -> list[str]:
    """The recipes shipped here, by the name ``rlflow -cn NAME`` takes."""
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in files(__name__).iterdir() if p.name.endswith(".yaml"))
