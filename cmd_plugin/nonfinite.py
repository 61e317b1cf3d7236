"""Non-finite training batches: say which files, contribute no gradient, stop when it persists.

A NaN or inf in a batch (a wav holding NaN samples, a broken file decoded to garbage, an
exploding loss) otherwise surfaces as fairseq's "gradients are Nan/Inf" (fp32) or an endless
"gradient overflow detected ... setting loss scale to" loop (fp16), neither naming a file.
:class:`NonFiniteGuard` is used by the task's ``train_step``:

* a forward hook on the model records which items' outputs (speech / image embeddings) are
  non-finite, so the report names the culprits, not just the batch;
* a batch whose loss is non-finite is reported with its files (manifest lines) and backpropagates
  a zero loss instead, so no NaN reaches the gradients (every data-parallel worker still calls
  backward, as DDP requires);
* more than ``patience`` such batches in a row stop the run with :class:`NonFiniteLossError`.
"""

import contextlib
import logging
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

MAX_FILES_SHOWN = 8


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses for too many batches in a row; names the files."""


def nonfinite_rows(tensor: torch.Tensor) -> List[int]:
    """Indices i of the rows ``tensor[i]`` (first dimension) holding a NaN or inf."""
    if tensor.dim() == 0:
        return [] if bool(torch.isfinite(tensor)) else [0]
    bad = ~torch.isfinite(tensor.detach().reshape(tensor.size(0), -1)).all(dim=1)
    return bad.nonzero()[:, 0].tolist()


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss that is exactly 0 with a zero gradient for every trainable parameter, built on a
    fresh graph (the NaN graph is never backpropagated)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return sum((p * 0.0).sum() for p in params)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class NonFiniteGuard:
    """State of the non-finite checks over training (one per task).

    Args:
        patience: consecutive non-finite batches tolerated; the next one stops the run.
        describe: maps (batch sample, item indices or None for all) to lines naming files.
    """

    def __init__(self, patience: int, describe):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.describe = describe
        self.consecutive = 0
        self.total = 0
        self._bad_outputs: Dict[str, List[int]] = {}

    @contextlib.contextmanager
    def watch(self, model: torch.nn.Module):
        """Record, during the block, the items whose model outputs are non-finite."""
        self._bad_outputs = {}

        def hook(module, inputs, output):
            if isinstance(output, dict):
                for key, value in output.items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.is_floating_point():
                        rows = nonfinite_rows(value)
                        if rows:
                            self._bad_outputs.setdefault(key, rows)

        handle = _unwrap(model).register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def check(self, loss: torch.Tensor, sample: dict, update_num: int) -> bool:
        """True when the batch is fine. Otherwise report it (files named) and return False, or
        raise :class:`NonFiniteLossError` when this makes more than ``patience`` in a row."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if finite and not self._bad_outputs:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        value = loss.detach().float().reshape(-1)[0].item()
        lines = []
        for key, rows in sorted(self._bad_outputs.items()):
            named = self.describe(sample, rows)
            lines.append(f"non-finite {key} output for {len(rows)} item(s):")
            lines += [f"  {line}" for line in named[:MAX_FILES_SHOWN]]
        if not self._bad_outputs:
            named = self.describe(sample, None)
            lines.append(f"no single item's output is non-finite; the batch's {len(named)} utterance(s):")
            lines += [f"  {line}" for line in named[:MAX_FILES_SHOWN]]
            if len(named) > MAX_FILES_SHOWN:
                lines.append(f"  ... and {len(named) - MAX_FILES_SHOWN} more")
        where = f"update {update_num + 1}, split {sample.get('split', '?')!r}"
        if self.consecutive > self.patience:
            raise NonFiniteLossError(
                f"training stopped: {self.consecutive} batches in a row gave a non-finite loss ({value}); the last "
                f"one ({where}):\n"
                + "\n".join(lines)
                + "\nCheck these files (silent, clipped or corrupt audio, a broken image), then the learning rate; "
                "task.nonfinite_patience sets how many such batches in a row are tolerated."
            )
        logger.warning(
            f"non-finite loss ({value}) at {where}; this batch contributes no gradient "
            f"({self.consecutive} in a row; {self.patience + 1} in a row stop the run):\n" + "\n".join(lines)
        )
        return False
