"""The NAFNet family: official compatibility, choices, padding, BatchNorm folding."""
import random

import pytest
import torch
from reference_nafnet import RefNAFNet

import ernas
from ernas.families.nafnet import NAFNet, official_arch
from ernas.complexity import count_params

OFFICIAL = {  # file -> (official parameter count, geometry)
    "nafnet_sidd_w32": 29_159_715,
    "nafnet_sidd_w64": 115_982_915,
    "nafnet_gopro_w32": 17_111_907,
    "nafnet_sidd_w16": 7_371_923,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_arch_files_have_official_parameter_counts(root, name):
    arch = ernas.load_arch(root / "search_spaces/archs" / f"{name}.yaml")
    model = ernas.build_model(arch)
    assert count_params(model) == OFFICIAL[name]
    g = arch.geometry
    ref = RefNAFNet(g["img_channel"], g["width"], g["middle_blk_num"], g["enc_blk_nums"],
                    g["dec_blk_nums"])
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert ours == theirs


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 37, 29)])
def test_official_state_dict_loads_strict_and_reproduces_outputs(shape):
    geom = dict(width=8, enc_blk_nums=[1, 2], middle_blk_num=2, dec_blk_nums=[2, 1])
    ref = _randomise(RefNAFNet(3, geom["width"], geom["middle_blk_num"], geom["enc_blk_nums"],
                               geom["dec_blk_nums"])).eval()
    ours = NAFNet(official_arch(**geom)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(shape)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert ours(x).shape == x.shape
    assert diff < 1e-5


def test_official_arch_function_matches_file(root):
    a = ernas.load_arch(root / "search_spaces/archs/nafnet_gopro_w32.yaml")
    b = official_arch(32, [1, 1, 1, 28], 1, [1, 1, 1, 1])
    assert a.geometry == b.geometry and a.values == b.values


def test_every_sampled_arch_builds_and_keeps_shape(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    rng = random.Random(0)
    for _ in range(8):
        arch = space.sample(rng)
        model = ernas.build_model(arch).eval()
        x = torch.rand(1, 3, 21, 18)
        assert model(x).shape == x.shape


def test_skipped_blocks_have_no_parameters(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    full, small = space.reference(), space.reference()
    small.values["encoders.0.0"]["keep"] = False
    n_full, n_small = count_params(ernas.build_model(full)), count_params(ernas.build_model(small))
    block = ernas.build_model(full).encoders[0][0]
    assert n_full - n_small == count_params(block)
    assert isinstance(ernas.build_model(small).encoders[0][0], torch.nn.Identity)


def test_batchnorm_fuse_keeps_outputs_and_removes_norms(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    arch = space.reference()
    for p in space.searchable:
        arch.values[p]["norm"] = "batchnorm"
    model = _randomise(ernas.build_model(arch), 1)
    model.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.rand(4, 3, 16, 16) * 3 + 1)
    model.eval()
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        before = model(x)
        fused = model.fuse()
        after = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert (before - after).abs().max().item() < 1e-4


def test_choices_change_block_shapes(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    arch = space.reference()
    arch.values["encoders.0.0"].update(kernel=7, dw_expand=1, ffn_expand=1, attention="none")
    block = ernas.build_model(arch).encoders[0][0]
    c = arch.geometry["width"]
    assert block.conv2.weight.shape == (c, 1, 7, 7)
    assert block.conv4.weight.shape == (c, c, 1, 1)
    assert isinstance(block.sca, torch.nn.Identity)
