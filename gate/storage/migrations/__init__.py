"""Alembic migrations, run by ``gate.storage.db.upgrade`` (``ftgate db upgrade``); there is no alembic.ini.

A package, so setuptools installs ``env.py`` and the revisions with the code. How to add a revision after
changing ``gate.storage.models``: see docs/gate-storage.md.
"""
