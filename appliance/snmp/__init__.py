"""What the project's SNMP agents and managers share: the SMIv2 reader and the RFC module
texts (:mod:`smi`, ``mibs/``), QKDN-MIB's text, and the SNMPv3 security settings and UDP
helpers (:mod:`usm`) that every agent and client uses (authPriv, SHA-256, AES-128)."""
