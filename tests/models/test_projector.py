from dataclasses import replace

import torch

from edgevlm.distill import init_from_teacher
from edgevlm.models import MedVLM


def test_position_table_starts_at_zero_and_loads_a_checkpoint_without_it(tiny_cfg):
    """A model with the table, initialized from one without it, encodes exactly as that one did."""
    torch.manual_seed(0)
    plain = MedVLM(tiny_cfg).eval()
    with_table = MedVLM(replace(tiny_cfg, projector=replace(tiny_cfg.projector, pos_embed=True))).eval()
    assert with_table.projector.pos_embed.shape == (1, tiny_cfg.num_visual_tokens, tiny_cfg.decoder.dim)
    report = init_from_teacher(with_table, plain)
    assert report["skipped"] == {"projector.pos_embed": "no teacher tensor"}
    volume = torch.randn(2, 1, *tiny_cfg.vision.image_size)
    torch.testing.assert_close(with_table.encode_image(volume), plain.encode_image(volume))


def test_position_table_adds_each_tokens_row_to_its_content(tiny_cfg):
    """Visual token k changes by exactly table row k, for every study in the batch: the place is in the
    content, where a one-layer decoder's attention-weighted mean keeps it."""
    model = MedVLM(replace(tiny_cfg, projector=replace(tiny_cfg.projector, pos_embed=True))).eval()
    volume = torch.randn(2, 1, *tiny_cfg.vision.image_size)
    before = model.encode_image(volume)
    with torch.no_grad():
        model.projector.pos_embed.normal_()
    after = model.encode_image(volume)
    torch.testing.assert_close(after - before, model.projector.pos_embed.expand_as(after))
