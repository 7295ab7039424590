"""Network adapters of the appliance: HTTP/2 between KMS nodes, HTTPS for ETSI 014.

Thin layers over asyncio TLS streams and the sans-IO ``h2``/``h11`` state machines; the
protocol logic of the KMS never sees a socket.
"""
