"""Helpers of the GPU tests that capture decode steps in a CUDA graph (imports no Triton)."""
import torch


def assert_equal_lists(got, want, label) -> None:
    """Bit-for-bit equality of two tensor lists, naming the first that differs."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), (label, i)


def assert_replays_from_snapshot(graph, state, snapshot, eager_state, outs, want,
                                 times: int = 2) -> None:
    """Restore the graph twin's device `state` (a list of tensors) from `snapshot` and replay
    `times` times: after each replay its state and outputs `outs` equal the eager twin's
    `eager_state` and `want`, bit for bit."""
    for replay in range(times):
        for t, s in zip(state, snapshot, strict=True):
            t.copy_(s)
        graph.replay()
        torch.cuda.synchronize()
        assert_equal_lists(state, eager_state, (replay, "state"))
        assert_equal_lists(outs, want, (replay, "output"))
