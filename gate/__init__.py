"""The gate service and the ``ftgate`` command line."""
