"""ray-unlearn: machine unlearning on Ray.

Subpackages: ``platform`` (the domain, no Ray), ``train`` (Ray Train jobs and the
unlearning executor), ``serve`` (Ray Serve gateway), ``tune`` (sweeps). The command line
is ``ray-unlearn`` (``ray_unlearn.cli``).
"""

__version__ = "0.1.0"
