"""Transport: the ZeroMQ ROUTER server, the wire protocol, CURVE authentication and the client."""
