"""The browser chat UI, shipped as package data and served as static files at ``/``.

Plain HTML, CSS and ES modules: nothing is built or fetched at run time (markdown-it and KaTeX
are vendored under ``static/vendor/`` with their licences; see README.md here). Serve
``STATIC_DIR`` at the site root, after the API routes, e.g.
``app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="web")``: the page loads its
files by relative URL and calls the API at ``/v1/...`` and ``/ready``.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"

__all__ = ["STATIC_DIR"]
