"""Triton python model `postprocessing` of the TensorRT-LLM layout: token ids from the tensorrtllm backend -> text.

Copied by `minitron serve --repo-only` into `<repository>/postprocessing/1/model.py`; it runs inside
NVIDIA's Triton TRT-LLM container. The tensorrt_llm model excludes the prompt from its output, so
each response (the whole answer, or the new tokens of one streaming step) is decoded as it comes.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = {key: value["string_value"] for key, value in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(parameters["tokenizer_dir"], trust_remote_code=False)

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [batch, beam, tokens]
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [batch, beam]
            texts = [self.tokenizer.decode(tokens[b, 0, :lengths[b, 0]], skip_special_tokens=True).encode() for b in range(tokens.shape[0])]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", np.array(texts, dtype=np.object_).reshape(-1, 1))]))
        return responses
