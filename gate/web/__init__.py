"""Server-rendered pages for compliance reviewers (and customers, read-only), under ``/review``.

``bp`` is registered by ``gate.api.create_app`` with the API's blueprints; see docs/reviewer-pages.md.
"""

from .views import bp

__all__ = ["bp"]
