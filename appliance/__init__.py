"""The node runtime of the QKD network, and the tools that configure, run and measure it.

``config`` reads topologies and node configurations, ``cli`` is the ``qkdn`` command,
``demo`` is the main job on emulated devices, ``logs`` keeps key material out of logs.
"""
