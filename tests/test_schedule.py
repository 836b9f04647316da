import pytest

from vitcli.train import lr_at


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5, abs=0.02)
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_no_warmup():
    assert lr_at(0, 10, 0, 2.0, 0.0) == pytest.approx(2.0)
