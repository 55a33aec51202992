def test_tiny_checkpoint_learns(tiny_checkpoint):
    # 10 classes: chance is 0.1
    assert tiny_checkpoint["test_top1"] > 0.5
