"""Device-side firmware of the emulated QKD modules and QRNG boards.

This package is the code that would run on a module's microcontroller: it answers
request frames, streams samples and reports status. Every module here is written in the
subset of Python that MicroPython runs (``make test`` compiles each one with
``mpy-cross``), and the same modules run under CPython behind the emulated pty and the
fake USB backend (:mod:`hal.emulated.firmware_host`).

Rules of this package: import only from :mod:`hal.firmware.compat` (the shim that
resolves ``time``/``utime``, ``struct``/``ustruct``, ``hashlib``/``uhashlib`` and
``binascii``/``ubinascii``) and from each other, by relative import; no ``typing``, no
dataclasses, no f-strings with format specs beyond MicroPython's, no numpy, no
``cryptography``. Key material never appears in an error frame.
"""
