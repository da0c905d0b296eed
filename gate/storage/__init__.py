"""Storage for the gate: the relational database (models, migrations, the audit log) and the artifact store.

Importing the package registers the audit log's append-only guards on the ORM.
"""

from . import audit_log  # noqa: F401  (registers the append-only mapper events)
