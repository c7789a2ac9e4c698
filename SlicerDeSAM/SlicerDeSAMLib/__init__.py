"""SlicerDeSAM's library: code the Slicer module uses that can be tested without Slicer.

``ServerClient`` (the HTTP client of the DeSAM service, with ``TrainingJobsClient``,
``ServerError`` and ``PromptResult``) and ``wire`` (the volume/mask codec, the same file
as the service's ``desam_server/wire.py``) import only the Python standard library and
numpy. Nothing is imported here eagerly.
"""
