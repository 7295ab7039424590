"""The key management system: the UKMS, AKMS and CKMS roles as engines without I/O, the
messages between nodes, the node adapter that runs them, and the key stores.

**Engines** (:mod:`engines`): ``engine.handle(event, now) -> list[Action]`` is each role's
whole interface (:mod:`events`). Inputs are requests and answers from other nodes, link
keys read from a QKD module, store results, the seams' answers, timers and, at a UKMS, the
SAEs' ETSI 014 calls; actions are calls and replies, link-key reads, store operations,
questions to the seams, timers, answers to SAEs, alarms and notices. Each request's life is
a state table (:mod:`engines.states`, :mod:`fsm`); an input its state does not allow is a
coded error and a terminal state. The pieces they use are without I/O too: :mod:`relay`
(one hop: OTP with a one-time Poly1305 key, or AES-256-GCM; pad accounting, replay
refusal), :mod:`linkend` (a link end's keys: master/slave, grants, epochs), :mod:`ksa` (key
batches under a CN key), :mod:`channel` (the PSK-bootstrapped AKMS-AKMS channel).

**Messages** (:mod:`messages`): every message between nodes is a typed, bounded,
versioned msgspec Struct, carried as canonical MessagePack; decoding is strict and every
failure a coded MessageError.

**Seams** (:mod:`seams`): the path provider (shortest paths of the topology, or the QKDN
Controller's routes: :mod:`appliance.control`), the request validator (the topology's
contracts, or the AAA device: :mod:`appliance.aaa`) and the session registry (one ETSI 014
session per SAE pair; 004 streams under sessions of their own in the same stores).

**The adapter** (:mod:`node`): one :class:`~node.KmsNode` per process composes the
engines of its node's roles (an access node's AKMS and CKMS in one process, or split in
two) and carries their actions out: HTTP/2 with mutual TLS between nodes (relay messages
for one neighbour in batches, :mod:`batching`), ETSI GS QKD 014 for SAEs (:mod:`etsi014`)
and ETSI GS QKD 004 key streams (:mod:`etsi004`: frames, stream decisions and records in
:mod:`frames004`, :mod:`streams`, :mod:`streamstore`; chunks are KSA keys whose IDs derive
from the stream and the index),
QKD modules through :mod:`hal`, PSK sources through :mod:`hsm.psk`, the key stores
(:mod:`shards`, :mod:`store`, :mod:`groupcommit`: a few SQLite files per node, keys by
session, takes pending until their answer has left), timers on the event loop.
:mod:`supervisor` runs a network of node processes; :mod:`sim` runs every node's engines
in one process on a seeded scheduler, with faults, and checks the invariants.

The end-to-end flow:

1. SAE A -> UKMS A: ``enc_keys(slave=SAE B, number, size)``. From the pair's stock when it
   holds enough keys of the usual size (when the contracts live at the AKMS, under AAA,
   once AKMS A has allowed and accounted for the request: ``KsaStocked``). Keys already
   leased into memory are answered at once, in the 014 server's ``data_received``
   (``Etsi014Api.handle_now`` -> ``UkmsEngine.from_lease_now``: one step, no event or
   task); otherwise:
2. UKMS A -> AKMS A: ``KsaRequest``. AKMS A asks the request validator, which names SAE
   B's UKMS and its AKMS and the relay mode (the contract's, else the network's).
3. AKMS A -> AKMS B: ``CnRequest`` in a ``Tagged`` envelope on their channel (opened
   from the PSK, re-keyed over the QKDN; a request seen before is refused).
4. AKMS B draws the keys and the CN key from its PTG.3 generator in one request, asks the
   path provider for the path to AKMS A, and side by side hands the CN key to its CKMS
   (``RelayLocal``) and delivers the slave's copies to UKMS B (``Deliver``, under that
   link's keys; UKMS B stores them).
5. CKMS B -> ... -> CKMS A: ``RelayItem`` per hop, opened and sealed again under each
   link's keys; a hop answers once it has checked the message and forwards it (pipelined);
   a hop that cannot forward aborts back along the path (``RelayAbort``, ``CnAbort``).
   CKMS A hands the CN key to AKMS A (``CnLocal``).
6. AKMS B answers step 3 with the keys sealed under the CN key; AKMS A opens them, erases
   the CN key, and answers step 2 under the UKMS-AKMS link's keys; UKMS A answers SAE A.
7. SAE B -> UKMS B: ``dec_keys(master=SAE A, key_IDs)``: the keys are taken pending,
   answered, and released once the answer has left; after a crash in between, the same
   slave may fetch them again (same IDs, same bits) within the store's refetch window.

Link keys: on every QKD link the lower node ID is the master end; it alone takes keys in
order and grants key IDs to the other end for the opposite direction, so both ends never
spend the same bits. A restarted end is recognised by its epoch (or, at a UKMS, by the
``fresh`` flag of its requests) and its peer resynchronises quietly. Failures answer the
SAE with a clean 503 and deliver nothing. Nothing here logs key material.
"""
