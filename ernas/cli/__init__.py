"""Thin command-line entry points: compose configs, call library functions."""
