"""Network adapters of the appliance: HTTP/2 between KMS nodes, HTTPS for ETSI 014.

Thin asyncio TLS adapters over sans-IO protocol cores: our own lean HTTP/2 core
(:mod:`.h2core`, with the HPACK decoder :mod:`.hpackdec`) between nodes, and a strict
HTTP/1.1 parser (:mod:`.http1`) for ETSI 014 clients. The protocol logic of the KMS never
sees a socket.
"""
