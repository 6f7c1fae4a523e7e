"""The producer: a Python client and the ``genimg`` CLI (thin wiring over ``genimg``)."""
