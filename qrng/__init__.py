"""PTG.3 random number generation (BSI AIS 20/31): raw source -> health tests ->
conditioning -> SP 800-90A DRBG -> output, one ``Ptg3Generator`` per node.

Empty until the qrng issue lands; every key the network creates will come from here.
"""
