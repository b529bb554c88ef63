"""The progress reward model: a language-model backbone with a scalar value head (METHOD.md section 4).

``f(h) = sigmoid(w · hidden(h)[last token] + b)``: the head is one ``Linear(hidden_size, 1)`` on
the backbone's last hidden state, read at the token positions the caller gives (the last token of
each step and of the prompt). The backbone is any Hugging Face base model (``AutoModel``): the
base of a causal LM checkpoint (e.g. the SFT policy folder: its LM head is not loaded), a hub name,
or a fresh ``tiny-llama[:k=v,...]``.

Export folder (``save_prm`` / ``load_prm``), ``format: hca-prm/1``:

* the backbone (``save_pretrained``: ``config.json`` + ``model.safetensors``), loadable with ``AutoModel``;
* the tokenizer (``save_pretrained``);
* ``value_head.safetensors``: ``weight [1, hidden_size]``, ``bias [1]`` (float32);
* ``prm_config.json``: format, hidden size, backbone class, and training facts (backbone source,
  data folder, ``max_length``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

PRM_FORMAT = "hca-prm/1"
HEAD_FILE = "value_head.safetensors"
CONFIG_FILE = "prm_config.json"


class ProgressRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, head_seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        g = torch.Generator().manual_seed(head_seed)  # independent of the global RNG
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, hidden_size, generator=g) / hidden_size ** 0.5)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, J]`` at token ``positions [B, J]`` of ``input_ids [B, T]`` (right-padded)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = hidden.gather(1, idx)  # [B, J, H]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()


def load_backbone(name_or_path: str, dtype: str | torch.dtype = "float32", tokenizer=None) -> nn.Module:
    """The base model (no LM head) of a causal LM or PRM folder, a hub name, or a ``tiny-llama`` spec."""
    from hca.models.loading import is_tiny_spec, load_causal_lm

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if is_tiny_spec(name_or_path):
        return load_causal_lm(name_or_path, dtype, tokenizer=tokenizer).model
    from transformers import AutoModel

    from hca.models.gguf import resolve_model_ref

    return AutoModel.from_pretrained(resolve_model_ref(name_or_path), dtype=dtype)


ZERO_AT_INIT = ("o_proj", "down_proj")  # output projections of Llama/Qwen/Mistral-style decoder layers


def grow_backbone(backbone: nn.Module, extra_layers: int) -> nn.Module:
    """Append ``extra_layers`` decoder layers on top of a base model (a copy of its last layer each,
    with the attention and MLP output projections zeroed, so the model computes exactly what it
    did before and the new layers start as the identity). Why: a causal layer at position ``t``
    only sees the previous layer's states, so a readout at a step's last token cannot compare what
    the backbone's *last* layer predicted at earlier tokens with what was written there; a layer
    on top can. The result is still a plain HF model (``num_hidden_layers`` updated), so it saves
    and reloads with ``save_pretrained`` / ``AutoModel``."""
    import copy

    if extra_layers <= 0:
        return backbone
    layers, cfg = getattr(backbone, "layers", None), backbone.config
    if not isinstance(layers, nn.ModuleList) or getattr(cfg, "num_hidden_layers", None) != len(layers):
        raise ValueError(f"cannot grow {type(backbone).__name__}: expected a decoder with .layers and num_hidden_layers")
    for _ in range(extra_layers):
        layer = copy.deepcopy(layers[-1])
        zeroed = [m for n, m in layer.named_modules() if n.split(".")[-1] in ZERO_AT_INIT and isinstance(m, nn.Linear)]
        if len(zeroed) < 2:
            raise ValueError(f"cannot grow {type(backbone).__name__}: no {ZERO_AT_INIT} projections to zero")
        with torch.no_grad():
            for m in zeroed:
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = len(layers)
        layers.append(layer)
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types + [cfg.layer_types[-1]] * extra_layers
    return backbone


def hidden_size_of(backbone: nn.Module) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def save_prm(backbone: nn.Module, head: nn.Linear, tokenizer, path: str | os.PathLike, extra: dict[str, Any]) -> Path:
    """Write the export folder atomically (temporary folder, then rename). ``backbone`` must be a
    plain ``PreTrainedModel`` (merge LoRA adapters first)."""
    from safetensors.torch import save_file

    from hca.models.loading import save_checkpoint

    def write_head(folder: Path) -> None:
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, str(folder / HEAD_FILE))
        cfg = {"format": PRM_FORMAT, "hidden_size": int(head.in_features), "backbone_class": type(backbone).__name__,
               **extra}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")

    return save_checkpoint(backbone, tokenizer, path, write_extra=write_head)


class LoadedPRM(NamedTuple):
    model: ProgressRewardModel  # eval mode, no grad
    tokenizer: Any  # the PRM's own tokenizer
    config: dict[str, Any]  # prm_config.json


def load_prm(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> LoadedPRM:
    """Load an export folder written by :func:`save_prm` (frozen, eval mode, on ``device``)."""
    from safetensors.torch import load_file

    from hca.models.loading import load_tokenizer

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} is not a PRM export folder (no {CONFIG_FILE}; train one with "
                                "python train.py fit --config configs/prm/arithmetic.yaml)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != PRM_FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, this reader reads {PRM_FORMAT!r}")
    backbone = load_backbone(str(path), dtype)
    model = ProgressRewardModel(backbone, cfg["hidden_size"])
    state = load_file(str(path / HEAD_FILE))
    if tuple(state["weight"].shape) != (1, cfg["hidden_size"]):
        raise ValueError(f"{path / HEAD_FILE}: head weight shape {tuple(state['weight'].shape)}, "
                         f"expected (1, {cfg['hidden_size']})")
    model.head.load_state_dict(state)
    return LoadedPRM(model.requires_grad_(False).eval().to(device), load_tokenizer(str(path)), cfg)
