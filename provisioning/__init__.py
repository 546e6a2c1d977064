"""Signed, encrypted model bundles; device identity; install into A/B slots."""
