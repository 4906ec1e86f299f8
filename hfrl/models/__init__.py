"""Pure-PyTorch Llama-family decoders (no torch.distributed here; TP is applied from parallelize.py).

- ``config.ModelConfig``: the architecture, from a transformers config or checkpoint folder.
- ``llama.CausalLM`` / ``llama.ValueModel``: the models, with the pipeline contract in llama's docstring.
- ``weights``: HF <-> hfrl names and TP shard plan as data; ``from_pretrained`` / ``save_pretrained``.
"""
from hfrl.models.config import ModelConfig
from hfrl.models.llama import CausalLM, ValueModel
from hfrl.models.weights import from_pretrained, save_pretrained

__all__ = ["ModelConfig", "CausalLM", "ValueModel", "from_pretrained", "save_pretrained"]
