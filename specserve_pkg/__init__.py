"""specserve: an LLM serving cluster on Ray Serve.

The subpackages map to the repository's top-level folders, in layers (imports only run down them):
``specserve.cluster`` (control-plane state and services: config, KV block store, metrics, Redis),
``specserve.actors`` (deployments that hold models; the engine in ``actors.engine``), ``specserve.routing``
(ingress and router), ``specserve.deploy`` (application builder, local launcher, Serve config, chart values),
``specserve.tools`` (benchmarks, fault injection, a client: never imported at run time) and ``specserve.protos``.
``specserve.cli`` is the ``specserve`` command.
"""

__version__ = "0.1.0"
