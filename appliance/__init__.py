"""The edge-appliance daemon, its client library and CLI."""

__version__ = "0.1.0"
