"""The AAA device of the data centre: users, contracts, the SAE directory, credit control
and accounting (issue 14), reached over SNMPv3 with its own MIB (``mib/QKDN-AAA-MIB.txt``).

Layout: :mod:`.registry` (SQLite: who may have what), :mod:`.ledger` (sans-IO credit
control: quota grants that never exceed a contract), :mod:`.accounting` (a hash-chained,
signed record of what was delivered), :mod:`.mib` (the MIB text read as data),
:mod:`.agent` (the pysnmp adapter) and :mod:`.client` (the AKMS side: a wallet that spends
granted quota locally). AAA never sees, stores or logs key material: it deals in counts of
keys and bits, SAE names and node IDs, never in key bytes, and it knows user and access
nodes (UKMS, AKMS), never carrier nodes, links or routes.
"""
