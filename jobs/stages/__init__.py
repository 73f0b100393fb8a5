"""The job's stages, one module each; :mod:`jobs.pipeline` runs them in order (``STAGES``)."""
