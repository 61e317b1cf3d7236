"""Momentum model of the coarse-to-fine method: an exponential moving average (EMA) of the
TRAINABLE parts only (ALBEF's ``_momentum_update``: theta_m <- m * theta_m + (1 - m) * theta).

The frozen upstreams (HuBERT, the image encoder) never change, so their EMA would equal
themselves: they are shared, never copied, and never run twice; momentum features are computed
from the same HuBERT states and image features as the online ones. :class:`MomentumCopies`
holds deep copies of the given trainable submodules and parameters as its own registered
submodules, so

* the copies live in the owning model's ``state_dict`` (saved in checkpoints, restored on
  resume) and follow ``model.to()`` / ``model.half()``;
* they are not trained (``requires_grad`` False, hence outside fairseq's optimizer, which
  takes only parameters that require grad);
* inference never needs them: :func:`drop_momentum_state` strips them from a state dict.

Why not fairseq's ``EMAModule``: docs/design.md.

Update once per optimizer update (ALBEF updates on every forward; under fairseq's
``update_freq > 1`` the online weights only change at an update): call
:meth:`MomentumCopies.step` from the model's ``set_num_updates``. It applies the EMA only when
``num_updates`` is larger than the update it last applied (kept in a buffer), so a reload that
calls ``set_num_updates`` with the same count changes nothing.
"""

import copy
from typing import Dict, Iterator, Mapping, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["MomentumCopies", "drop_momentum_state", "ema_update_"]


@torch.no_grad()
def ema_update_(momentum: torch.Tensor, online: torch.Tensor, decay: float) -> None:
    """In place: ``momentum <- decay * momentum + (1 - decay) * online`` (ALBEF's Eq. for
    theta_m), computed in fp32 and stored back in ``momentum``'s dtype."""
    if momentum.is_floating_point():
        updated = momentum.float().mul_(decay).add_(online.detach().float(), alpha=1.0 - decay)
        momentum.copy_(updated)
    else:  # integer buffers (counters) are copied
        momentum.copy_(online)


class _Parameter(nn.Module):
    """Holder that lets a bare parameter be copied like a module."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone(), requires_grad=False)


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots
    return name.replace(".", "__")


class MomentumCopies(nn.Module):
    """EMA copies of named trainable submodules / parameters of an online model.

    Args:
        online: ``{name: module or parameter}`` -- the trainable parts to track, e.g.
            ``{"layer_weights": model.layer_weights, "cls_token": model.cls_token,
            "speech_encoder": model.speech_encoder, "speech_proj": model.speech_proj}``.
            Every parameter given must require grad: a frozen part (an upstream) is refused,
            since its EMA is itself and copying it would only double memory.
        dropout: True -> the copies follow the owner's train()/eval() mode (ALBEF: momentum
            encoders are ordinary submodules, so their dropout is active in training);
            False -> the copies always run in eval mode (deterministic targets).
        keep_fp32: True -> the copies stay float32 when the owner is cast (fairseq's ``--fp16``
            and ``--bf16`` call ``model.half()`` / ``model.bfloat16()``; device moves still
            apply). With decay 0.995 an update moves a weight by 0.5 % of its distance to the
            online weight, less than half a unit in the last place of fp16/bf16 for nearly every
            weight: a half-precision EMA would stop moving. The caller then runs the copies on
            ``.float()`` inputs. False -> the copies take the owner's dtype.

    The online objects are referenced, not registered (their parameters belong to the owner).
    ``self[name]`` is the momentum copy: a module, or for a parameter the tensor
    (``requires_grad`` False).

    Buffers: ``last_update`` () int64, the ``num_updates`` at which :meth:`step` last applied.
    """

    def __init__(
        self, online: Mapping[str, Union[nn.Module, nn.Parameter]], dropout: bool = True, keep_fp32: bool = True
    ):
        super().__init__()
        self.keep_fp32 = keep_fp32
        if not online:
            raise ValueError("MomentumCopies needs at least one submodule or parameter to track")
        self.dropout = dropout
        self.copies = nn.ModuleDict()
        online_refs: Dict[str, Union[nn.Module, nn.Parameter]] = {}
        for name, part in online.items():
            if isinstance(part, nn.Parameter) or (isinstance(part, torch.Tensor) and part.requires_grad):
                if not part.requires_grad:
                    raise ValueError(f"momentum copy of {name!r}: the parameter is frozen (requires_grad False)")
                self.copies[_key(name)] = _Parameter(part)
            elif isinstance(part, nn.Module):
                frozen = [n for n, p in part.named_parameters() if not p.requires_grad]
                if frozen:
                    raise ValueError(
                        f"momentum copy of {name!r}: it holds frozen parameters ({', '.join(frozen[:3])}); "
                        "frozen upstreams are shared by the online and momentum paths, never copied"
                    )
                duplicate = copy.deepcopy(part)
                duplicate.requires_grad_(False)
                self.copies[_key(name)] = duplicate
            else:
                raise TypeError(
                    f"momentum copy of {name!r}: expected an nn.Module or nn.Parameter, got {type(part).__name__}"
                )
            online_refs[name] = part
        # a plain dict attribute: nn.Module does not register its contents
        self._online = online_refs
        self.register_buffer("last_update", torch.zeros((), dtype=torch.long))
        if not dropout:
            self.copies.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.dropout:
            self.copies.eval()
        return self

    def _apply(self, fn, recurse=True):
        if not self.keep_fp32:
            return super()._apply(fn, recurse)

        def device_only(tensor):
            if not tensor.is_floating_point():
                return fn(tensor)
            # where fn sends a tensor, read from an empty one; the dtype is kept
            target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            return tensor.to(device=target.device)

        return super()._apply(device_only, recurse)

    def names(self):
        return list(self._online)

    def __getitem__(self, name: str) -> Union[nn.Module, torch.Tensor]:
        copy_ = self.copies[_key(name)]
        return copy_.value if isinstance(copy_, _Parameter) else copy_

    def _pairs(self) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, momentum tensor, online tensor) over all parameters and buffers."""
        for name, part in self._online.items():
            held = self.copies[_key(name)]
            if isinstance(held, _Parameter):
                yield name, held.value, part
                continue
            online_state = dict(part.named_parameters())
            online_state.update(part.named_buffers())
            for sub, tensor in list(held.named_parameters()) + list(held.named_buffers()):
                if sub not in online_state:
                    raise RuntimeError(f"momentum copy of {name!r} has {sub!r}, which the online module lacks")
                yield f"{name}.{sub}", tensor, online_state[sub]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step of every copy: ``theta_m <- decay * theta_m + (1 - decay) * theta``;
        buffers (e.g. normalisation statistics) are averaged alike, integer buffers copied."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"momentum decay must be in [0, 1], got {decay}")
        for _, momentum, online in self._pairs():
            ema_update_(momentum, online, decay)

    @torch.no_grad()
    def step(self, num_updates: int, decay: float) -> bool:
        """Apply :meth:`update` once per optimizer update: only when ``num_updates`` exceeds the
        update recorded at the last step (then record it). Returns whether it applied.

        Call from the model's ``set_num_updates``; fairseq calls it after every optimizer
        update, and again with the same count when a checkpoint is loaded (a no-op here).
        """
        if num_updates <= int(self.last_update):
            return False
        self.update(decay)
        self.last_update.fill_(int(num_updates))
        return True

    @torch.no_grad()
    def copy_from_online(self) -> None:
        """Set every copy equal to its online part (e.g. after loading online weights that came
        without momentum copies)."""
        for _, momentum, online in self._pairs():
            momentum.copy_(online)


def drop_momentum_state(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` without the keys under ``prefix`` (the momentum copies' prefix in
    the owning model, e.g. ``"momentum."``): what an inference-only export keeps."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
