"""Forward hooks: called inside the block, removed after it, even when the block raises."""

from __future__ import annotations

import pytest

from pistill.hooks import forward_hooks


@pytest.mark.parametrize("pre, with_kwargs", [(True, False), (False, False), (False, True)])
def test_hooks_run_inside_and_are_removed(pre, with_kwargs):
    import torch

    lin, seen = torch.nn.Linear(2, 2), []
    x = torch.ones(1, 2)
    with forward_hooks([(lin, lambda *a: seen.append(len(a)))], pre=pre, with_kwargs=with_kwargs):
        lin(x)
    lin(x)
    assert seen == [2 if pre else 4 if with_kwargs else 3]
    with pytest.raises(RuntimeError), forward_hooks([(lin, lambda *a: seen.append(0))], pre=pre):
        raise RuntimeError
    lin(x)
    assert len(seen) == 1 and not lin._forward_hooks and not lin._forward_pre_hooks
