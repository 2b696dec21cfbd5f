"""The ezkl pipeline, keys, SRS, commitments, verification and the offline auditor.

Knows ``zkunlearn.circuits``; never imports the provider server or the client SDK, so the auditor runs alone.
"""

__all__: list[str] = []
