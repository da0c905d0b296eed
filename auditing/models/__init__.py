"""The model layer shared by alignment, auditing and gate.

Import from the submodules (``auditing.models.loading`` ...): this package stays
import-light so that command-line help does not pay for torch and diffusers.
"""
