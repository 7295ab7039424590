"""The node runtime and the data-centre services of the QKD network.

``config`` reads topologies and node configurations, ``cli`` is the ``qkdn`` command,
``demo`` is the main job on emulated devices, ``logs`` keeps key material out of logs.
"""
