"""Training on CUDA (cuDNN kernels): run on a machine with a GPU, skipped elsewhere."""

import pytest
import torch
from conftest import demo_config

from training.models.recurrence import CELLS, RecurrentLayer
from training.train import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


@pytest.mark.parametrize("cell", CELLS)
def test_cudnn_kernels_agree_with_the_explicit_loop(cell, monkeypatch):
    # cuDNN may use TF32 tensor cores for float32 RNNs (PyTorch's default): exact math here
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 6, 9).cuda()
    x = torch.randn(5, 12, 6, device="cuda")
    state = torch.randn(5, layer.state_size, device="cuda")
    lengths = torch.tensor([12, 3, 7, 1, 12], device="cuda")
    for rows in (None, lengths):
        fused_out, fused_state = layer(x, state, rows)
        loop_out, loop_state = layer.forward_loop(x, state, rows)
        limits = lengths if rows is not None else torch.full_like(lengths, 12)
        valid = torch.arange(12, device="cuda")[None] < limits[:, None]
        difference = max((fused_out[valid] - loop_out[valid]).abs().max().item(),
                         (fused_state - loop_state).abs().max().item())
        print(f"{cell} lengths={rows is not None}: max abs difference {difference:.2e}")
        assert difference <= 1e-5


def test_training_on_cuda_learns_and_exports(synth_dir, tmp_path):
    config = demo_config("demo-lm", synth_dir, 'train.device="cuda"', "train.epochs=1")
    summary = train(config, tmp_path / "run")
    assert summary["valid"]["ppl"] < 10.0
    from serving.model.runtime import ModelRuntime
    from training.export import export_run

    metadata = export_run(tmp_path / "run", tmp_path / "repo" / "lm" / "1")
    assert max(metadata["verification"]["max_abs_diff"].values()) <= 1e-4
    assert ModelRuntime(tmp_path / "repo" / "lm" / "1").run_lm([[1, 2]], [2]).state is not None
