"""Built-in network families; each module exposes ``FAMILY`` (see ``ernas.family``)."""
