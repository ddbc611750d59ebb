"""The ``rustinfer`` command."""
