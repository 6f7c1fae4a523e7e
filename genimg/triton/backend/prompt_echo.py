"""Triton Python-backend ``prompt_echo``: returns ``PROMPT`` BYTES [B, 1] unchanged as ``ECHO``.

A diagnostic model, added to a repository only with
``build_repository(..., with_echo=True)`` (the tests do): it shows that the
bytes a client sends are the bytes a Python-backend model receives (case C5:
non-ASCII text, a trailing NUL byte), independent of any tokenizer.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Identity on BYTES."""

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
            echo = np.empty(raw.shape, dtype=np.object_)
            for idx in np.ndindex(raw.shape):
                echo[idx] = bytes(raw[idx])
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ECHO", echo)]))
        return responses
