"""The QKDN Manager side of FCAPS: QKDN-MIB (:mod:`mib`), the SNMPv3 agent every KMS node
runs (:mod:`agent`, its values read live by :mod:`nodeview`), and the manager that
receives the nodes' notifications, polls them and keeps alarms, history and inventory."""
