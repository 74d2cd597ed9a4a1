"""The ``wildloop`` command line."""
