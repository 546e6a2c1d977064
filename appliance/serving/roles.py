"""What each client role may do. The allow-list gives every CURVE key a role; without CURVE every
connection gets ``[auth] anonymous_role``. A refused op is answered ``forbidden`` and audited.

- ``infer``: generate; cancel and end_session for its own requests and conversations; health; info.
- ``admin``: everything ``infer`` may, plus ``metrics``, and cancel/end_session on behalf of any
  client (the ``identity`` field names it).
- ``gateway`` (the HTTP gateway, docs/HTTP.md): forwards requests naming its end user in
  ``on_behalf_of`` (whose role, ``infer`` or ``admin``, then applies), and reports refused API keys
  with ``auth_failed``. Only a gateway may send either; the daemon trusts the identity it names.
"""

from __future__ import annotations

from appliance.transport import protocol as P

INFER, ADMIN, GATEWAY = "infer", "admin", "gateway"
ROLES = (INFER, ADMIN, GATEWAY)

_OPS = {
    INFER: frozenset({P.OP_GENERATE, P.OP_CANCEL, P.OP_END_SESSION, P.OP_HEALTH, P.OP_INFO}),
    ADMIN: frozenset({P.OP_GENERATE, P.OP_CANCEL, P.OP_END_SESSION, P.OP_HEALTH, P.OP_INFO, P.OP_METRICS}),
    GATEWAY: frozenset({P.OP_HEALTH, P.OP_INFO, P.OP_AUTH_FAILED}),  # everything else on behalf of a user
}
_ACT_FOR_OTHERS = frozenset({ADMIN})


def check(role: str, req: P.Request) -> None:
    """Raise ``ProtocolError(forbidden)`` unless ``role`` may send ``req``."""
    if req.op not in _OPS.get(role, frozenset()):
        raise P.ProtocolError(P.E_FORBIDDEN, f"role {role!r} may not use op {req.op!r}", req.id, op=req.op)
    if req.identity is not None and role not in _ACT_FOR_OTHERS:
        raise P.ProtocolError(
            P.E_FORBIDDEN,
            f"role {role!r} may not act for another client (field 'identity' is admin only)",
            req.id,
            op=req.op,
        )
