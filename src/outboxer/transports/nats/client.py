"""nats-py, imported once, with the install hint when it is missing.

Every module of the package that talks to a server imports the client from here, so
``import outboxer.transports.nats`` (the settings) works without the extra.
"""

from __future__ import annotations

try:
    import nats
    from nats import errors as nats_errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js import api as js_api
    from nats.js import errors as js_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the NATS transport needs nats-py: pip install 'outboxer[nats]'") from exc

__all__ = ["Client", "JetStreamContext", "Msg", "js_api", "js_errors", "nats", "nats_errors"]
