"""The key management system: key stores, the UKMS/AKMS/CKMS engines, the relay protocol
and the interfaces between them (DESIGN.md §2-3)."""
