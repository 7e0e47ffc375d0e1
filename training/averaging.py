"""NT-ASGD (Merity et al. 2017): plain SGD until validation stops improving, then the
average of the weights after every step from there on is the model.

The average is torch's `AveragedModel` (an equal-weight running mean, which is what ASGD
with t0 = 0 and lambda = 0 computes); the trigger is AWD-LSTM's non-monotone rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def nonmonotone_trigger(history: Sequence[float], value: float, nonmono: int,
                        higher_is_better: bool) -> bool:
    """True when `value` is worse than the best of the epochs before the last `nonmono`
    (`history` holds the earlier epochs' values, oldest first)."""
    if len(history) <= nonmono:
        return False
    earlier = history[:-nonmono]
    return value < max(earlier) if higher_is_better else value > min(earlier)


class WeightAverage:
    """The running average once started; before that, nothing (the model is itself)."""

    def __init__(self) -> None:
        self.average: AveragedModel | None = None

    @property
    def started(self) -> bool:
        return self.average is not None

    def start(self, model: nn.Module) -> None:
        self.average = AveragedModel(model)
        self.average.update_parameters(model)  # the first update copies the weights

    def update(self, model: nn.Module) -> None:
        if self.average is not None:
            self.average.update_parameters(model)

    def model(self, model: nn.Module) -> nn.Module:
        """What to evaluate, keep as best.pt and export: the average once it has started."""
        return model if self.average is None else self.average.module

    @property
    def steps_averaged(self) -> int:
        return 0 if self.average is None else int(self.average.n_averaged)

    def state_dict(self) -> dict | None:
        return None if self.average is None else self.average.state_dict()

    def load_state_dict(self, model: nn.Module, state: dict | None) -> None:
        if state is None:
            self.average = None
            return
        self.average = AveragedModel(model)
        self.average.load_state_dict(state)
        self.average.to(next(model.parameters(), torch.empty(0)).device)
