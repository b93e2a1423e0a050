"""A token-window language model small enough for Trainer tests that resume and compare bit for bit."""
import dataclasses
import types

import torch

VOCAB, SEQ = 16, 6


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    mtp_logits: tuple
    aux_loss: None = None


class TinyLM(torch.nn.Module):
    """ids [B, S] int64 -> Out(logits [B, S, VOCAB] fp32): embedding, tanh, linear head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 12)
        self.head = torch.nn.Linear(12, VOCAB)
        self.config = types.SimpleNamespace(n_pred_tokens=1)  # a token-window model to the Trainer

    def forward(self, ids):
        return Out(self.head(torch.tanh(self.embed(ids))), ())
