"""WORKDIR/loss.png: the loss curve every run draws from its metrics.jsonl."""
import numpy as np
from PIL import Image

from sanajax.training.loss_plot import smooth, write_loss_plot


def test_smooth_is_a_trailing_mean():
  np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
  np.testing.assert_allclose(smooth(np.array([2.0, 4.0]), 5), [2.0, 3.0])


def test_loss_plot_is_a_png_of_the_loss_rows(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5} for s in range(1, 60)] + [{"step": 60, "eval_psnr": 30.0}]
  path = write_loss_plot(rows, str(tmp_path / "sub" / "loss.png"), title="dit loss")
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (360, 640, 3)
  assert (image < 128).any() and (image > 200).any()  # lines on a light background, not a blank image


def test_no_loss_rows_no_plot(tmp_path):
  assert write_loss_plot([{"step": 1, "eval_psnr": 30.0}], str(tmp_path / "loss.png")) is None
  assert not (tmp_path / "loss.png").exists()
