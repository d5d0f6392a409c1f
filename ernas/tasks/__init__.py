"""Built-in tasks; each module exposes ``TASK`` (see ``ernas.task``)."""
