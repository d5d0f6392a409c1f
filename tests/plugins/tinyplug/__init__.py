"""A miniature third-party ernas plug-in: family ``tinyfam`` and task ``tinytask``."""
