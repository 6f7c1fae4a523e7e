"""Serving genimg's models with Triton Inference Server (their tensor contract is :mod:`genimg.contract`).

* :mod:`genimg.triton.repo` — builds the model repository (cpu and tensorrt flavours).
* :mod:`genimg.triton.server` — runs the ``tritonserver`` of the ``nvidia-pytriton`` wheel locally.
* :mod:`genimg.triton.client` — the contract-aware client the workers use.
* :mod:`genimg.triton.reference` — the same ONNX models in-process (test reference, benchmark baseline).
* ``genimg/triton/backend/`` — the Python-backend ``model.py`` files copied into the repository.
* :mod:`genimg.triton.cli` / :mod:`genimg.triton.cli_build` — ``genimg triton …`` and ``genimg models build-repo``.
"""
