"""A value whose only element sits at a stride other than 1 (``logits[:, -1, k]`` at batch 1:
torch calls it contiguous, since size-1 dimensions don't count) is sent back like any other,
as a metric and as a saved activation."""
from __future__ import annotations

import torch


def test_metric_that_is_a_strided_view(local_models, remote_models):
    tokens = local_models["tiny-gpt2"].to_tokens("hello world")
    assert tokens.shape[0] == 1

    def metric(logits):
        return logits[:, -1, 5]

    got = remote_models["tiny-gpt2"].run_with_hooks(tokens, metric=metric, progress=False)
    with torch.no_grad():
        want = metric(local_models["tiny-gpt2"](tokens))
    torch.testing.assert_close(got, want)


def test_saved_strided_single_element(local_models, remote_models):
    tokens = local_models["tiny-gpt2"].to_tokens("hello world")
    out = []

    def store(act, hook):
        out.append(act[:, -1, 3])

    name = "blocks.0.hook_resid_post"
    remote_models["tiny-gpt2"].run_with_hooks(tokens, fwd_hooks=[(name, store)],
                                              return_type=None, progress=False)
    with torch.no_grad():
        local_models["tiny-gpt2"].run_with_hooks(tokens, fwd_hooks=[(name, store)])
    got, want = out
    torch.testing.assert_close(got, want)
