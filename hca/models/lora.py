"""LoRA adapters for the RL policy (peft), injected in place.

:func:`add_lora` injects LoRA layers into the policy's modules with
``peft.inject_adapter_in_model`` -- the model stays the same ``PreTrainedModel`` class (no
``PeftModel`` wrapper), so the rollout engine and teacher forcing call it exactly as before
(``cache`` / ``logits_to_keep`` keyword arguments included) -- and freezes everything but the
adapters: only ``lora_A`` / ``lora_B`` weights require gradients, reach the optimizer and change.
:func:`merged_copy` returns a plain copy with ``W + (alpha / r) B A`` folded into every adapted
weight and the LoRA layers removed, which ``save_pretrained`` writes as an ordinary checkpoint
(the RL export is thus loadable without peft). The input model keeps its adapters.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the policy's linear layers (all other weights frozen)."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input (0: the ratio of a sample is exact at the first update)
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))  # module names

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"invalid LoRA settings: {self}")


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject adapters into ``model`` (in place) and freeze all non-LoRA parameters; returns ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.target_modules), bias="none")
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no module of the model matches target_modules={list(settings.target_modules)}")
    return model


def has_lora(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with every LoRA layer merged into its base layer and removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, module.get_base_layer())
    return out.requires_grad_(True)
