"""Which tensors the default selection keeps dense on LitGPT's ``GPT`` (pythia-14m, random weights, offline).

    pip install litgpt   # in an environment of its own: it pins its own jsonargparse
    python benchmarks/litgpt_targets.py

LitGPT registers the output head ``lm_head`` before ``transformer.wte``. Registration order would make the head
"the first layer" and a block's last projection "the last"; the callback records the forward pass's order on the
first training batch and keeps the token embedding dense instead. Prints the plan at fit start (registration order),
the order the forward pass used, and what the callback masks after a two-step fit.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from litgpt import GPT, Config
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback


class LitGPTModule(L.LightningModule):
    """A LitGPT model as a new user wraps it: nothing Top-KAST specific."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = GPT(Config.from_name(name))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self.model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pythia-14m")
    parser.add_argument("--last", action="store_true", help="dense_last_layer=True too")
    args = parser.parse_args()
    torch.manual_seed(0)
    module = LitGPTModule(args.model)
    vocab = module.model.config.padded_vocab_size
    data = DataLoader(TensorDataset(torch.randint(vocab, (8, 33))), batch_size=4)
    callback = TopKASTCallback(dense_last_layer=args.last, verbose=False)
    before = callback.plan(module).selection
    print(f"{args.model}: {len(before.masked) + len(before.kept_dense)} candidates")
    print("registration order keeps dense:", before.kept_dense)
    trainer = L.Trainer(
        callbacks=[callback],
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, data)
    print(
        "forward order, first three and last:",
        [*(callback.forward_order or [])[:3], "...", *(callback.forward_order or [])[-1:]],
    )
    print("after the first batch, kept dense:", callback.kept_dense)
    engine = callback.engine
    assert engine is not None
    print("masked:", len(engine.tensors), "tensors; head masked:", "model.lm_head.weight" in engine.tensors)


if __name__ == "__main__":
    main()
