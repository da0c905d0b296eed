"""ResAlign hardening of base models (filled in by the alignment work; see docs/architecture.md)."""
