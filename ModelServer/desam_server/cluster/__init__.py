"""The service beyond one machine: Ray Serve replicas of the same FastAPI app.

``desam-server cluster`` (``run``) deploys ``replica.build_application``: one replica of the
service per GPU behind Ray Serve's HTTP proxies, with volume affinity (``middleware``), a
feature-cache folder per replica (``cache_slot``), jobs visible from every replica
(``job_board``, ``job_sync``, ``job_routes``) and decoder activations reaching every
replica (``api.DecoderVersions.sync_if_changed``). docs/CLUSTER.md is the guide.

Only ``replica`` and the functions of ``run`` import Ray, lazily; importing this package
or any other module of ``desam_server`` never needs it.
"""
