"""Fitness of a structured candidate: KL divergence of its next-token distribution from the
dense model's on calibration tokens, after a few steps of light fine-tuning (DarwinLM's
training-aware selection). The dense side is kept as final hidden states, so only the
output head is re-run to get its distribution; a vocabulary-wide logit cache is avoided."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from ..progress import bar

from ..engine.models import decoder_layers, grads_only_for


class DenseReference:
    """Final hidden states of the dense model for calibration windows, computed on demand."""

    def __init__(self, model, windows: torch.Tensor):
        self.model, self.windows = model, windows
        self.hidden: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def hidden_states(self, index: int) -> torch.Tensor:
        """The dense final hidden states of window `index`, computed once (call this for every
        window before changing the model's decoder weights in place)."""
        if index not in self.hidden:
            ids = self.windows[index:index + 1].to(_device(self.model))
            self.hidden[index] = self.model.base_model(input_ids=ids).last_hidden_state
        return self.hidden[index]

    @torch.inference_mode()
    def logprobs(self, index: int) -> torch.Tensor:
        return F.log_softmax(self.model.get_output_embeddings()(self.hidden_states(index)).float(), -1)


def _device(model):
    return next(model.parameters()).device


@torch.inference_mode()
def kl_divergence(model, reference: DenseReference, indices) -> float:
    """Mean over tokens of KL(dense || model) on the reference windows `indices`."""
    total, count = 0.0, 0
    for i in indices:
        ids = reference.windows[i:i + 1].to(_device(model))
        logq = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        logp = reference.logprobs(i)
        total += float((logp.exp() * (logp - logq)).sum())
        count += logp.shape[1]
    return total / count


def trainable(model) -> list[torch.nn.Parameter]:
    """The Linear weights of the decoder blocks: what light training updates."""
    return [m.weight for block in decoder_layers(model) for m in block.modules()
            if isinstance(m, torch.nn.Linear)]


def light_train(model, windows: torch.Tensor, lr: float, progress: bool = False, desc: str = "fine-tuning"):
    """One AdamW step of next-token loss per window (batch 1) on the decoder Linears only."""
    if not len(windows):
        return model
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    try:
        with grads_only_for(model, params):
            for i in bar(range(len(windows)), desc=desc, enabled=progress):
                ids = windows[i:i + 1].to(_device(model))
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        model.eval()
    return model
