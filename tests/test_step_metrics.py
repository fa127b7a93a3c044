"""StepMetrics: attributes, and the read-only mapping Trainer.step returned before it was a class."""

import json

import numpy as np
import pytest

import meshpar as mp
from meshpar.train.metrics import StepMetrics


def test_attributes_and_the_mapping_agree():
    m = StepMetrics(loss=2.5, grad_norm=0.5, step_time_s=0.1, skipped=False)
    assert m.loss == m["loss"] == 2.5
    assert list(m) == ["grad_norm", "loss", "step_time_s", "skipped"]  # the dict's order
    assert m.get("aux") is None and "loss_weight" not in m and len(m) == 4
    assert m == {"grad_norm": 0.5, "loss": 2.5, "step_time_s": 0.1, "skipped": False}
    assert json.loads(json.dumps(dict(m)))["loss"] == 2.5
    with pytest.raises(KeyError):
        m["aux"]
    with pytest.raises(TypeError):
        m["loss"] = 1.0  # read-only, as a frozen dataclass


def test_ratio_weight_and_aux_appear_only_when_given():
    m = StepMetrics(loss=1.0, grad_norm=1.0, step_time_s=0.0, skipped=True, loss_weight=0.0,
                    aux={"tokens": 3.0, "hist": np.arange(2)})
    assert list(m)[-2:] == ["loss_weight", "aux"]
    assert m["loss_weight"] == 0.0 and m["aux"]["tokens"] == 3.0
    assert "StepMetrics(grad_norm=1.0" in repr(m)


def test_keyword_only_and_public():
    assert mp.StepMetrics is StepMetrics
    with pytest.raises(TypeError):
        StepMetrics(1.0, 1.0, 0.0, False)
