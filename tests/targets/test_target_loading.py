"""Loading the target straight onto its device, and ``device_map`` (a target split over devices):
the captured layers may run on different devices; their outputs are gathered on the logits'.

What runs where: on a CPU-only host ``device_map="auto"`` places every module on the CPU (one
device, no dispatch), so the split itself runs only where CUDA is present (cuda:0 + cpu with one
GPU, cuda:0 + cuda:1 with two); those tests are skipped here with the reason.
"""

from __future__ import annotations

import pytest
import torch

from draftcache.defaults import default_target_path
from draftcache.targets import HFEagle3TargetModel
from draftcache.targets.loading import load_target_model


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference():
    target = HFEagle3TargetModel(load_target_model(default_target_path(), device=torch.device("cpu")))
    ids, mask = _inputs()
    return target, target.forward_capture(ids, mask, capture_final_hidden=True)


def test_weights_load_onto_the_device_in_eval_mode(reference):
    target, _ = reference
    assert not target.model.training
    assert {p.device.type for p in target.model.parameters()} == {"cpu"}
    assert next(target.model.parameters()).dtype == torch.float32


def test_device_map_auto_runs_and_matches_a_single_device_load(reference):
    _, want = reference
    target = HFEagle3TargetModel(load_target_model(default_target_path(), device=torch.device("cpu"),
                                                   device_map="auto"))
    got = target.forward_capture(*_inputs(), capture_final_hidden=True)
    for name in ("logits", "aux_hidden_states", "final_hidden"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)


def test_device_map_is_checked():
    with pytest.raises(ValueError, match="device_map must be 'auto', a \\{module: device\\} dict or None"):
        load_target_model(default_target_path(), device=torch.device("cpu"), device_map="balanced_low_0")


def _split_map(num_layers: int, second: str) -> dict[str, str]:
    """Embeddings and the first half of the layers on cuda:0, the rest and the head on ``second``."""
    device_map = {"model.embed_tokens": "cuda:0", "model.rotary_emb": "cuda:0"}
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = "cuda:0" if i < num_layers // 2 else second
    device_map.update({"model.norm": second, "lm_head": second})
    return device_map


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split the target over two devices")
@pytest.mark.parametrize("second", ["cpu", "cuda:1"])
def test_captured_layers_on_different_devices_are_gathered_on_the_logits_device(reference, second):
    if second == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    ref_target, want = reference
    layers = ref_target.num_layers
    model = load_target_model(default_target_path(), device=torch.device("cuda:0"),
                              device_map=_split_map(layers, second), dtype=torch.float32)
    target = HFEagle3TargetModel(model, aux_layer_ids=ref_target.aux_layer_ids)
    devices = {str(next(model.model.layers[i].parameters()).device) for i in target.aux_layer_ids}
    assert len(devices) == 2, devices  # the captured layers really live on two devices
    got = target.forward_capture(*_inputs(), capture_final_hidden=True)
    assert got.aux_hidden_states.device == got.logits.device == got.final_hidden.device
    for name in ("logits", "aux_hidden_states", "final_hidden"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), rtol=1e-4, atol=1e-4)
