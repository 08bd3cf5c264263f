"""Backends: one module per real tool, plus ``sim``, all behind the ``Backend`` protocol."""
