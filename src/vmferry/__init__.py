"""vmferry: a KVM virtual machine monitor built around live migration."""

import logging

__version__ = "0.2.0"

logging.getLogger("vmferry").addHandler(logging.NullHandler())
