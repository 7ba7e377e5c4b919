from blv_kernels.__main__ import main


def test_demo_prints_loss_and_gradient(capsys):
    main(["--batch", "1", "--height", "8", "--width", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "BLV loss (sigma=6.0" in out and "gradient: shape (1, 19, 8, 16)" in out
