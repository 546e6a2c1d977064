"""The Python client, under the name the README gives it: ``from appliance.client import Client``.

The implementation lives in ``appliance.transport.client`` (beside the server and the wire protocol it speaks);
this module is its public import path.
"""

from appliance.transport.client import Client, ClientError

__all__ = ["Client", "ClientError"]
