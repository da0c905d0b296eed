"""Dataset intake for customer fine-tuning uploads: safe unzip, image re-encoding, contamination scan.

``ingest(upload, limits, out_dir, scanner)`` turns a zip into the caption folder that
training reads, or raises ``IntakeError`` (HTTP status, reason code, offending files) and
leaves nothing behind; ``screen(folder, scanner, limits)`` scans such a folder with one more detector. The
service runs both on a worker (``gate.pipeline.intake``). See docs/intake.md.
"""

from .dataset import RECORD, IntakeResult, ingest, screen
from .limits import REASONS, IntakeError, IntakeLimits
from .scan import ScanError, Screening, strictest

__all__ = ["REASONS", "RECORD", "IntakeError", "IntakeLimits", "IntakeResult", "ScanError", "Screening", "ingest",
           "screen", "strictest"]
