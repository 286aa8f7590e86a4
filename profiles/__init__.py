"""Device profiles, provider selection, the edge bundle and ``flash-board``.

Light on purpose: importing :mod:`splitedge.profiles` loads the standard library only
(no onnxruntime, no torch, no click). The profile files are ``profiles/*.toml``
(schema in :mod:`splitedge.profiles.schema`); provider selection is in
:mod:`splitedge.profiles.select`; :mod:`~splitedge.profiles.bundle`,
:mod:`~splitedge.profiles.flash` and :mod:`~splitedge.profiles.selftest` build,
install and check the edge bundle.

    from splitedge import profiles
    p = profiles.load("jetson-nano")                     # or a path; ProfileError on any problem
    c = profiles.select_providers(p, ["CPUExecutionProvider"])
    c.sentence  # 'forward: CPU (TensorRT, CUDA not available); training: CPU (CUDA not available)'
"""

from .schema import Profile, ProfileError, load, loads, shipped
from .select import EdgeSettings, ProviderChoice, edge_settings, select_providers, short_name

__all__ = [
    "EdgeSettings", "Profile", "ProfileError", "ProviderChoice", "edge_settings", "load", "loads",
    "select_providers", "shipped", "short_name",
]
