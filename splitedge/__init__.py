"""splitedge: split learning between edge boards (ONNX Runtime) and a cloud (PyTorch).

The distribution's subpackages live in the repository's top-level folders:

=======================  ====================================================
``splitedge.export``     model zoo, cut points, ``export-client`` (torch)
``splitedge.codecs``     activation/gradient codecs (numpy only)
``splitedge.runtime_edge``  ONNX Runtime training on the edge, ``edge-train``
``splitedge.runtime_cloud`` PyTorch server sub-model, ``cloud-serve`` (torch)
``splitedge.profiles``   device profiles, provider selection, ``flash-board``
=======================  ====================================================
"""

__version__ = "0.1.0"
