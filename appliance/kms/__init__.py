"""The key management system: key stores, the UKMS/AKMS/CKMS engines, the relay protocol
and the interfaces between them (DESIGN.md §2-3).

Protocol pieces, without I/O: :mod:`store` (encrypted SQLite key stores, exactly-once
take; :mod:`groupcommit` shares transactions), :mod:`relay` (one hop: OTP + one-time
Poly1305 or AES-256-GCM, pad accounting, replay rejection), :mod:`links` (the key supply
of one QKD link: master/slave roles, grants), :mod:`ksa` (key batches under a CN key),
:mod:`channel` (the AKMS-AKMS channel), :mod:`etsi014` (the SAE-facing API). The node
adapters: :mod:`node` composes :mod:`nodebase`, :mod:`ukms`, :mod:`akms` and :mod:`ckms`;
:mod:`supervisor` runs a network of node processes. Transports are in
:mod:`appliance.net`.

The end-to-end flow these pieces implement:

1. SAE A -> UKMS A: ``enc_keys(slave=SAE B, number, size)`` over ETSI 014 (HTTP/1.1, mTLS).
   With a KSA stock for the pair it is served at once; otherwise:
2. UKMS A -> AKMS A, HTTP/2 ``POST /v1/ksa``: request ID, SAE IDs, number, size.
3. AKMS A checks the contract (AAA over SNMPv3 once the mgmt issue lands; the topology's
   contracts until then) and resolves SAE B -> UKMS B -> AKMS B.
4. AKMS A -> AKMS B, HTTP/2 ``POST /v1/cn``: request ID, number, size, SAE IDs, UKMS B,
   and the CKMS to deliver the CN key to (AKMS A's colocated CKMS).
5. AKMS B draws the CN key from its PTG.3 generator (OTP mode: as long as the KSA payload;
   GCM mode: 256 bits) and hands it to its colocated CKMS with the path (shortest by length
   from the topology, until the controller issue lands: path selection moves there).
6. CKMS B -> ... -> CKMS A, HTTP/2 ``POST /v1/relay``: one :mod:`relay` hop message per
   link, decrypted and re-encrypted at each trusted node; a hop answers once it has
   checked the message and forwards it in the background (a pipelined chain; a hop that
   cannot forward aborts the request back along the path). CKMS A hands the CN key to
   AKMS A.
7. AKMS B draws the KSA keys (PTG.3, one request with the CN key), delivers them to UKMS
   B under the B-side UKMS-AKMS link keys beside the relay (``POST /v1/ksa/deliver``;
   UKMS B stores them for dec_keys), then answers
   step 4 with the KSA keys encrypted under the CN key. AKMS A decrypts, erases the CN
   key, and answers step 2 under the A-side UKMS-AKMS link keys; UKMS A answers step 1.
8. SAE B -> UKMS B: ``dec_keys(master=SAE A, key_IDs)``: each key once, to SAE B only.

Link keys: on every QKD link the lower node ID is the master end of the QKDM pair and the
only one that takes keys in order; it grants batches of key IDs to the other end for
the opposite direction (:mod:`links`), so both ends never spend the same bits. Failures
anywhere answer the SAE with 503 and deliver nothing; keys stored at UKMS B for a request
that failed later are never handed out without their ID and expire.
"""
