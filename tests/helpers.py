"""Shared test helpers: teacher-forced decoding through the KV cache, the way the engine sees generation."""
from __future__ import annotations

import torch

# the paper's drift rule with no hysteresis and no threshold margin: re-traces at almost every window
HAIR_TRIGGER = dict(detector="paper", window=5, monitored_layers=(-1,), floor=0.0, delta=0.0, trigger_count=1,
                    cooldown=0)


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, prefix: int, chunk: int = 1,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill `prefix` tokens, then feed the rest `chunk` tokens at a time; logits of every position."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    out = model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
    logits = [out.logits]
    for start in range(prefix, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def layout(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Every tensor of the model's state, with its strides (an engine may lay weights out differently)."""
    return {name: (value.clone(), value.stride()) for name, value in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """The model holds no dartprune handle or tapped FFN, and every tensor has its values and layout of `before`."""
    from dartprune.engine.taps import TappedFFN
    assert getattr(model, "dartprune_handle", None) is None
    assert not any(isinstance(m, TappedFFN) for m in model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name][0]) and value.stride() == before[name][1], name


@torch.no_grad()
def dense_reference_logprobs(model, ids: list[int] | torch.Tensor, traced: int) -> torch.Tensor:
    """The teacher-forced protocol's targets from one plain forward over the whole sequence (no cache): the dense
    ground truth."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    logp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    targets = ids[0, traced + 1:]
    return logp[traced:-1].gather(1, targets[:, None])[:, 0]
