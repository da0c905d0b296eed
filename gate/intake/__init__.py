"""Dataset intake for customer fine-tuning uploads: safe unzip, image re-encoding, contamination scan.

``ingest(upload, limits, out_dir, scanner)`` turns a zip into the caption folder that
training reads, or raises ``IntakeError`` (HTTP status, reason code, offending files) and
leaves nothing behind. See docs/intake.md.
"""

from .dataset import IntakeResult, ingest
from .limits import REASONS, IntakeError, IntakeLimits
from .scan import ScanError

__all__ = ["REASONS", "IntakeError", "IntakeLimits", "IntakeResult", "ScanError", "ingest"]
