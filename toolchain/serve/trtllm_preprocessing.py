"""Triton python model `preprocessing` of the TensorRT-LLM layout: text -> token ids for the tensorrtllm backend.

Copied by `minitron serve --repo-only` into `<repository>/preprocessing/1/model.py`; it runs inside
NVIDIA's Triton TRT-LLM container (which ships transformers). Refuses empty prompts, prompts longer
than the engine's max_input_len and max_tokens outside (0, max_seq_len - prompt] with an error
response that names the problem.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def first(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        parameters = {key: value["string_value"] for key, value in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(parameters["tokenizer_dir"], trust_remote_code=False)
        self.max_input_len = int(parameters["max_input_len"])
        self.max_seq_len = int(parameters["max_seq_len"])
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def prepare(self, request):
        text = first(request, "QUERY")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"] if text.strip() else []
        max_tokens = int(first(request, "REQUEST_OUTPUT_LEN"))
        if not ids:
            raise ValueError("empty prompt: text_input must hold some text")
        if len(ids) > self.max_input_len:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the engine's max_input_len {self.max_input_len}")
        if max_tokens <= 0 or len(ids) + max_tokens > self.max_seq_len:
            raise ValueError(f"max_tokens {max_tokens} must be positive and leave prompt + max_tokens <= max_seq_len {self.max_seq_len}")
        end_id, pad_id = first(request, "END_ID"), first(request, "PAD_ID")
        scalar = lambda value: np.array([[value]], dtype=np.int32)  # noqa: E731
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_ID", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", scalar(len(ids))),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", scalar(max_tokens)),
            pb_utils.Tensor("OUT_END_ID", scalar(self.end_id if end_id is None else int(end_id))),
            pb_utils.Tensor("OUT_PAD_ID", scalar(self.pad_id if pad_id is None else int(pad_id))),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.prepare(request))
            except (ValueError, TypeError) as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
