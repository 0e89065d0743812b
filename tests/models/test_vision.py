import torch
import torch.nn.functional as F

from edgevlm.models import VisionConfig, VisionEncoder3D, conv3d_to_linear_weight, patchify
from edgevlm.models.medvlm import init_weights


def test_patchify_linear_equals_conv3d():
    """Reshape + Linear computes exactly the stride-equals-kernel Conv3d (DESIGN decision 2)."""
    x = torch.randn(2, 1, 8, 12, 16, dtype=torch.float64)
    conv_w = torch.randn(5, 1, 2, 3, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    conv = F.conv3d(x, conv_w, bias, stride=(2, 3, 4))  # (B, 5, 4, 4, 4)
    linear = patchify(x, (2, 3, 4)) @ conv3d_to_linear_weight(conv_w).T + bias
    torch.testing.assert_close(linear, conv.flatten(2).transpose(1, 2), rtol=0, atol=1e-10)


def test_patchify_token_order_is_raster_dhw():
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    tokens = patchify(x, (2, 2, 2))
    # token 1 is grid cell (d=0, h=0, w=1): its first element is voxel (0, 0, 2)
    assert tokens[0, 1, 0] == x[0, 0, 0, 0, 2]
    # token 2 is cell (0, 1, 0): voxel (0, 2, 0); element order within a patch is (pd, ph, pw)
    assert tokens[0, 2, 0] == x[0, 0, 0, 2, 0]
    assert tokens[0, 0, 1] == x[0, 0, 0, 0, 1] and tokens[0, 0, 2] == x[0, 0, 0, 1, 0]


def test_forward_shapes_cls_and_factorized():
    for pos, cls in (("learned", True), ("factorized", False)):
        cfg = VisionConfig(image_size=(8, 16, 16), patch_size=(2, 4, 4), dim=32, depth=2, heads=4, mlp_dim=64,
                           pos_embed=pos, cls_token=cls)
        enc = VisionEncoder3D(cfg)
        enc.apply(init_weights)
        out = enc(torch.randn(3, 1, 8, 16, 16))
        assert out.shape == (3, 64 + int(cls), 32)
        assert enc.patch_tokens(torch.randn(1, 1, 8, 16, 16)).shape == (1, 64, 32)
        assert torch.isfinite(out).all()


def test_factorized_position_embedding_is_sum_of_axes():
    cfg = VisionConfig(image_size=(4, 8, 12), patch_size=(2, 4, 4), dim=8, depth=1, heads=2, mlp_dim=16,
                       pos_embed="factorized")
    enc = VisionEncoder3D(cfg)
    for p in (enc.pos_embed_d, enc.pos_embed_h, enc.pos_embed_w):
        torch.nn.init.normal_(p)
    pos = enc.position_embedding()[0]  # grid (2, 2, 3)
    d, h, w = 1, 0, 2
    expected = enc.pos_embed_d[d] + enc.pos_embed_h[h] + enc.pos_embed_w[w]
    torch.testing.assert_close(pos[d * 6 + h * 3 + w], expected)


def test_wrong_input_shape_names_expected():
    cfg = VisionConfig(image_size=(8, 16, 16), patch_size=(2, 4, 4), dim=32, depth=1, heads=4, mlp_dim=64)
    enc = VisionEncoder3D(cfg)
    try:
        enc(torch.randn(1, 1, 8, 16, 12))
    except ValueError as e:
        assert "(B, 1, 8, 16, 16)" in str(e)
    else:
        raise AssertionError("mis-shaped input accepted")
