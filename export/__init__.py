"""Model zoo, cut points and ``export-client``.

Only :mod:`splitedge.export.manifest` is torch-free (the edge reads manifests);
the other modules need torch and are imported explicitly.
"""
