"""``python -m singleton_integrations`` is the ``singleton`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
