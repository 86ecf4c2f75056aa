"""specserve: an LLM serving cluster on Ray Serve.

The subpackages map to the repository's top-level folders: ``specserve.cluster`` (control plane),
``specserve.actors`` (deployments that hold models), ``specserve.routing`` (ingress and router),
``specserve.protos`` and ``specserve.deploy``.
"""

__version__ = "0.1.0"
