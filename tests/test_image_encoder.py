"""Image encoder: shapes, parity with the backbones' own outputs, gates, checkpointing, configs, preprocessing.

Every model here is a 3-block ViT of width 64 on 32x32 images (16 patches).
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch

from encoders import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderOutput,
    ImageEncoder,
    ImageEncoderConfig,
    MediaEncoder,
    image_transform,
)

from encoders.image import sincos_position_embedding
from mm_llama.training.scale import compile_blocks_
BACKBONES = ["timm:vit_tiny_patch16_224", "open_clip:ViT-B-16"]


def tiny(backbone: str, **overrides: object) -> ImageEncoderConfig:
    fields: dict[str, object] = dict(backbone=backbone, image_size=32, patch_size=8, depth=3, width=64, heads=2, intermediate_layers=(0, 1))
    fields.update(overrides)
    return ImageEncoderConfig(**fields)


def blocks_of(encoder: ImageEncoder) -> torch.nn.ModuleList:
    model = encoder.backbone.model
    return model.transformer.resblocks if encoder.config.library == "open_clip" else model.blocks


def library_final_patch_tokens(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """The backbone library's own normed final patch tokens, [b, g, w]."""
    model = encoder.backbone.model
    if encoder.config.library == "open_clip":
        model.output_tokens = True
        _, tokens = model(images)
        return tokens
    return model.forward_features(images)[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("layers", [(), (0, 2)])
@pytest.mark.parametrize("drop_cls", [True, False])
def test_output_shapes(backbone: str, layers: tuple[int, ...], drop_cls: bool) -> None:
    encoder = ImageEncoder(tiny(backbone, intermediate_layers=layers, drop_cls=drop_cls))
    out = encoder(torch.randn(2, 3, 32, 32))
    s_e = 16 + (0 if drop_cls else 1)
    assert isinstance(encoder, MediaEncoder)
    assert encoder.out_dim == 64 * (1 + len(layers))
    assert encoder.num_tokens == s_e
    assert out.tokens.shape == (2, s_e, encoder.out_dim)
    assert out.mask.shape == (2, s_e) and out.mask.dtype == torch.bool and bool(out.mask.all())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_features_equal_block_outputs(backbone: str) -> None:
    """[final | block 0 | block 2] slices equal the library's final tokens and forward-hooked block outputs."""
    encoder = ImageEncoder(tiny(backbone, intermediate_layers=(0, 2), drop_cls=False))
    images = torch.randn(2, 3, 32, 32)
    captured: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks_of(encoder)):
        block.register_forward_hook(lambda _m, _a, out, index=index: captured.__setitem__(index, out))
    with torch.no_grad():
        tokens = encoder(images).tokens  # [b, 1 + g, 3 * w]
        reference_final = library_final_patch_tokens(encoder, images)  # [b, g, w]
    final, block0, block2 = tokens.split(64, dim=-1)
    torch.testing.assert_close(final[:, 1:], reference_final, rtol=0, atol=1e-6)
    torch.testing.assert_close(block0, captured[0], rtol=0, atol=0)
    torch.testing.assert_close(block2, captured[2], rtol=0, atol=0)
    assert not torch.allclose(block0, block2)


def test_global_layers_gate_init_and_identity_at_zero() -> None:
    plain = ImageEncoder(tiny("timm:vit_tiny_patch16_224"))
    gated = ImageEncoder(tiny("timm:vit_tiny_patch16_224", n_global_layers=2))
    assert all(p.item() == pytest.approx(math.pi / 4) for n, p in gated.named_parameters() if n.endswith("_gate"))
    gated.backbone.load_state_dict(plain.backbone.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, param in gated.named_parameters():
            if name.endswith("_gate"):
                param.zero_()
        torch.testing.assert_close(gated(images).tokens, plain(images).tokens, rtol=0, atol=0)
        gated.global_layers[1].mlp_gate.fill_(0.5)
        changed = gated(images).tokens
    final, intermediates = changed.split([64, 128], dim=-1)
    assert not torch.allclose(final, plain(images).tokens[..., :64])
    # Global layers run on the final output only; intermediate features are untouched.
    torch.testing.assert_close(intermediates, plain(images).tokens[..., 64:], rtol=0, atol=0)


def test_global_gates_are_trainable() -> None:
    encoder = ImageEncoder(tiny("open_clip:ViT-B-16", n_global_layers=1))
    encoder(torch.randn(2, 3, 32, 32)).tokens.square().mean().backward()
    gates = [p for n, p in encoder.named_parameters() if n.endswith("_gate")]
    assert len(gates) == 2
    assert all(g.requires_grad and g.grad is not None and g.grad.abs().item() > 0 for g in gates)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_blocks_are_the_ones_the_forward_runs_in_order_and_checkpointing_runs_each_twice(backbone: str) -> None:
    encoder = ImageEncoder(tiny(backbone, n_global_layers=2)).train()
    blocks = encoder.blocks()
    assert len(blocks) == 3 + 2 and blocks[3:] == list(encoder.global_layers)
    assert all(a is b for a, b in zip(blocks, blocks_of(encoder)))
    images = torch.randn(2, 3, 32, 32)
    for enabled, expected in ((False, [0, 1, 2, 3, 4]), (True, [0, 1, 2, 3, 4] * 2)):
        encoder.set_grad_checkpointing(enabled)
        ran = []
        hooks = [b.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(blocks)]
        encoder(images).tokens.square().mean().backward()
        for hook in hooks:
            hook.remove()
        # in order through the forward; recomputed in backward, last block first
        assert ran[:5] == [0, 1, 2, 3, 4] and sorted(ran) == sorted(expected), ran


@pytest.mark.parametrize("backbone", BACKBONES)
def test_compiled_blocks_are_captured_whole_and_compute_the_same(backbone: str) -> None:
    """``compile_blocks_`` compiles the ViT's and the global blocks; dynamo captures each without a
    graph break (``fullgraph``; the ``eager`` backend runs the captured graph as it is), plain and
    recomputed in backward."""
    encoder = ImageEncoder(tiny(backbone, n_global_layers=2)).train()
    images = torch.randn(2, 3, 32, 32)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        encoder.zero_grad(set_to_none=True)
        tokens = encoder(images).tokens
        tokens.square().mean().backward()
        return tokens.detach(), {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}

    tokens, grads = run()
    torch._dynamo.reset()
    assert compile_blocks_(encoder, backend="eager", fullgraph=True) == encoder.blocks()
    for checkpointing in (False, True):
        encoder.set_grad_checkpointing(checkpointing)
        compiled_tokens, compiled_grads = run()
        torch.testing.assert_close(compiled_tokens, tokens, rtol=0, atol=1e-6)
        assert compiled_grads.keys() == grads.keys() and len(grads) > 10
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_grad_checkpointing_matches(backbone: str) -> None:
    encoder = ImageEncoder(tiny(backbone, n_global_layers=1)).train()
    images = torch.randn(2, 3, 32, 32)

    def run(enabled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        encoder.zero_grad()
        encoder.set_grad_checkpointing(enabled)
        tokens = encoder(images).tokens
        tokens.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        return tokens.detach(), grads

    tokens_off, grads_off = run(False)
    tokens_on, grads_on = run(True)
    assert encoder.backbone.model.transformer.grad_checkpointing if backbone.startswith("open_clip") \
        else encoder.backbone.model.grad_checkpointing
    torch.testing.assert_close(tokens_on, tokens_off, rtol=0, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() == {n for n, _ in encoder.named_parameters()}
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(backbone: str, suffix: str, tmp_path) -> None:
    source = ImageEncoder(tiny(backbone))
    path = tmp_path / f"backbone{suffix}"
    state = source.backbone.model.state_dict()
    if suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    loaded = ImageEncoder(tiny(backbone, checkpoint=str(path)))
    fresh = ImageEncoder(tiny(backbone))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).tokens, source(images).tokens, rtol=0, atol=0)
        assert not torch.allclose(fresh(images).tokens, source(images).tokens)


def test_checkpoint_is_loaded_strictly(tmp_path) -> None:
    state = ImageEncoder(tiny("timm:vit_tiny_patch16_224")).backbone.model.state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="unexpected.weight"):
        ImageEncoder(tiny("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "extra.pt")))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_sincos_position_table_separates_patches(backbone: str) -> None:
    """Random init starts from a 2-D sine-cosine table as large as the patch signal, not std 0.02."""
    encoder = ImageEncoder(tiny(backbone, pos_embed_init="sincos"))  # 4x4 patches, width 64
    table = encoder.backbone.patch_position_embedding()
    assert table.shape == (16, 64) and table.requires_grad
    torch.testing.assert_close(table.detach(), sincos_position_embedding(4, 4, 64))
    assert table.detach().pow(2).mean().sqrt() > 0.5  # vs 0.02 for the libraries' init
    distances = torch.cdist(table.detach(), table.detach())  # [16, 16]
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.5  # every patch has its own code
    library = ImageEncoder(tiny(backbone)).backbone.patch_position_embedding()
    assert library.detach().std() < 0.2  # timm: std 0.02; open_clip: width ** -0.5 (0.125 here)


def test_sincos_table_rows_and_columns() -> None:
    table = sincos_position_embedding(2, 3, 8)  # [6, 8]: row half, then column half
    assert table.shape == (6, 8)
    torch.testing.assert_close(table[0, :4], table[2, :4])  # same row, other column
    torch.testing.assert_close(table[0, 4:], table[3, 4:])  # same column, other row
    assert not torch.allclose(table[0, :4], table[3, :4])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 2, 6)


def test_checkpoint_keeps_its_own_position_embedding(tmp_path) -> None:
    source = ImageEncoder(tiny("timm:vit_tiny_patch16_224", pos_embed_init="library"))
    path = tmp_path / "vit.pt"
    torch.save(source.backbone.model.state_dict(), path)
    loaded = ImageEncoder(tiny("timm:vit_tiny_patch16_224", checkpoint=str(path), pos_embed_init="sincos"))
    torch.testing.assert_close(loaded.backbone.patch_position_embedding(), source.backbone.patch_position_embedding())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "keras:vit_tiny"}, "'keras'"),
        ({"backbone": "vit_tiny_patch16_224"}, "'vit_tiny_patch16_224'"),
        ({"intermediate_layers": (0, 3)}, "index 3 is out of range for a ViT of depth 3"),
        ({"intermediate_layers": (-1,)}, "index -1 is out of range"),
        ({"intermediate_layers": (1, 0)}, r"\(1, 0\)"),
        ({"image_size": 30}, "image_size 30"),
        ({"width": 64, "heads": 3}, "heads 3"),
        ({"depth": 0}, "depth must be > 0 or None, got 0"),
        ({"n_global_layers": -2}, "-2"),
        ({"pos_embed_init": "learned"}, "pos_embed_init"),
        ({"patch_attention": "local"}, "patch_attention must be one of"),
        ({"backbone": "open_clip:ViT-B-32", "patch_attention": "self"}, "needs a timm backbone"),
        ({"tiles": 0}, "tiles must be > 0, got 0"),
        ({"image_size": 32, "tiles": 3}, "image_size 32 is not a multiple of tiles 3"),
        ({"stem_norm": "batch"}, "stem_norm must be one of"),
        ({"backbone": "open_clip:ViT-B-32", "stem_norm": "layer"}, "needs a hybrid timm backbone"),
    ],
)
def test_bad_config_values_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**{"backbone": "timm:vit_tiny_patch16_224", **overrides})


def test_layer_index_checked_against_backbone_default_depth() -> None:
    # depth=None keeps vit_tiny's 12 blocks, known only once the backbone is built.
    config = tiny("timm:vit_tiny_patch16_224", depth=None, intermediate_layers=(12,))
    with pytest.raises(ValueError, match="index 12 is out of range for a ViT of depth 12"):
        ImageEncoder(config)


def test_unknown_open_clip_model_raises() -> None:
    with pytest.raises(ValueError, match="'ViT-Q-99'"):
        ImageEncoder(tiny("open_clip:ViT-Q-99"))


def test_wrong_image_shape_raises() -> None:
    encoder = ImageEncoder(tiny("timm:vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match=r"\(2, 3, 64, 64\)"):
        encoder(torch.randn(2, 3, 64, 64))


def test_config_accepts_list_layers() -> None:
    assert tiny("timm:vit_tiny_patch16_224", intermediate_layers=[0, 1]).intermediate_layers == (0, 1)


def test_encoder_output_validates_mask() -> None:
    with pytest.raises(ValueError, match="bool"):
        EncoderOutput(tokens=torch.zeros(1, 2, 3), mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        EncoderOutput(tokens=torch.zeros(1, 2, 3), mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_preprocess_shape_dtype_and_normalisation(mode: str) -> None:
    # A uniform grey 128 stays 128 through an antialiased bicubic resize (weights sum to 1),
    # so each channel must read (128 / 255 - mean) / std; alpha is dropped, grey replicated.
    image = PIL.Image.new("RGB", (37, 23), (128, 128, 128)).convert(mode)
    out = image_transform(16, train=False)(image)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 16, 16)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 16, 16), rtol=0, atol=1e-6)


def test_preprocess_train_is_deterministic_without_augment() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    train, evaluate = image_transform(24, train=True), image_transform(24, train=False)
    torch.testing.assert_close(train(image), evaluate(image), rtol=0, atol=0)
    # The image is not flipped: the left half stays on the left.
    left_bright = PIL.Image.fromarray(np.concatenate([np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)], 1))
    out = train(left_bright)
    assert out[:, :, :6].mean() > out[:, :, -6:].mean()
    assert image_transform(24, train=True, augment=True)(image).shape == (3, 24, 24)


def test_preprocess_output_feeds_encoder() -> None:
    encoder = ImageEncoder(tiny("timm:vit_tiny_patch16_224"))
    transform = image_transform(32, train=False)
    batch = torch.stack([transform(PIL.Image.new(mode, (40, 30))) for mode in ("RGB", "RGBA", "L")])
    assert encoder(batch).tokens.shape == (3, 16, encoder.out_dim)


@pytest.mark.parametrize("patch_size, tokens", [(None, 4), (4, 16)])
def test_default_encoder_is_a_hybrid_vit(patch_size: int | None, tokens: int) -> None:
    overrides = {} if patch_size is None else {"patch_size": patch_size}
    encoder = ImageEncoder(ImageEncoderConfig(**overrides))
    model = encoder.backbone.model
    from timm.layers.hybrid_embed import HybridEmbed

    assert isinstance(model.patch_embed, HybridEmbed)  # ResNet stem, then patches of its stride-4 map
    images = torch.randn(2, 3, 64, 64)
    out = encoder(images)
    assert out.tokens.shape == (2, tokens, 3 * 192) and encoder.num_tokens == tokens
    final = library_final_patch_tokens(encoder, images)  # [b, tokens, 192]
    assert any(torch.allclose(out.tokens[..., i * 192:(i + 1) * 192], final, atol=1e-5) for i in range(3))


def test_a_patch_larger_than_the_hybrid_stem_grid_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ImageEncoder(ImageEncoderConfig(patch_size=32))  # 64 px -> a 16x16 stem map: no 32-patch fits


@pytest.mark.parametrize("patch_attention", ["global", "self"])
def test_self_patch_attention_keeps_each_token_to_its_own_patch(patch_attention: str) -> None:
    """Disturb one patch's embedding (after the stem, before the blocks): with ``"self"`` the
    other tokens come out bit-for-bit the same, with ``"global"`` they change."""
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(patch_attention=patch_attention)).eval()
    images = torch.randn(2, 3, 64, 64)
    clean = encoder(images).tokens  # [2, 4, 576]

    def disturb_first_patch(module, args, output):  # output: [b, g, w] patch embeddings
        output = output.clone()
        output[:, 0] += torch.randn_like(output[:, 0])
        return output

    handle = encoder.backbone.model.patch_embed.register_forward_hook(disturb_first_patch)
    try:
        disturbed = encoder(images).tokens
    finally:
        handle.remove()
    assert not torch.allclose(disturbed[:, 0], clean[:, 0], atol=1e-3)
    others = (disturbed[:, 1:] - clean[:, 1:]).abs().max().item()
    if patch_attention == "self":
        assert others < 1e-5
    else:
        assert others > 1e-3


@pytest.mark.parametrize("backbone", ["timm:vit_tiny_r_s16_p8_224", "open_clip:ViT-B-32"])
def test_tiles_are_encoded_alone_and_keep_their_place(backbone: str) -> None:
    """``tiles=2``: repainting the top-left tile changes its own tokens only, bit for bit (the hybrid
    stem's GroupNorm included); the same pixels in two tiles give the same intermediate features
    and final features that differ by the tiles' positions only."""
    torch.manual_seed(0)
    sizes = {} if backbone.startswith("timm:") else {"patch_size": 16, "depth": 2, "width": 64, "heads": 2}
    encoder = ImageEncoder(ImageEncoderConfig(backbone=backbone, tiles=2, intermediate_layers=(0,), **sizes)).eval()
    per_tile = encoder.num_tokens // 4
    assert encoder.config.tile_size == 32 and per_tile >= 1
    images = torch.randn(2, 3, 64, 64)
    images[:, :, 32:, 32:] = images[:, :, :32, :32]  # bottom right = top left
    with torch.no_grad():
        clean = encoder(images).tokens  # [2, 4 * per_tile, d_e]
        repainted = images.clone()
        repainted[:, :, :32, :32] = torch.randn(2, 3, 32, 32)
        changed = encoder(repainted).tokens
    assert clean.shape == (2, encoder.num_tokens, encoder.out_dim)
    assert not torch.allclose(changed[:, :per_tile], clean[:, :per_tile], atol=1e-3)
    assert torch.equal(changed[:, per_tile:], clean[:, per_tile:])
    top_left, bottom_right = clean[:, :per_tile], clean[:, 3 * per_tile :]
    w = encoder.backbone.width
    torch.testing.assert_close(top_left[..., w:], bottom_right[..., w:])  # intermediates: no position
    offset = bottom_right[..., :w] - top_left[..., :w]
    expected = encoder.tile_position[3] - encoder.tile_position[0]  # [1, w]
    torch.testing.assert_close(offset, expected.expand_as(offset), atol=1e-5, rtol=0)
    assert expected.abs().max() > 0.1


def test_layer_stem_norm_needs_a_hybrid_stem() -> None:
    with pytest.raises(ValueError, match="whose stem has a GroupNorm"):
        ImageEncoder(tiny("timm:vit_tiny_patch16_224", stem_norm="layer"))


@pytest.mark.parametrize("stem_norm", ["group", "layer"])
def test_layer_stem_norm_keeps_each_cell_to_itself(stem_norm: str, tmp_path) -> None:
    """Repaint the bottom-right quadrant: with ``"layer"`` the stem features whose receptive field lies in
    the top-left quadrant stay bit-for-bit the same, with ``"group"`` (whole-image statistics) they
    change. The parameter names are the same, so a checkpoint of either loads into the other."""
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(stem_norm=stem_norm)).eval()
    stem = encoder.backbone.model.patch_embed.backbone
    images = torch.rand(2, 3, 64, 64)
    repainted = images.clone()
    repainted[:, :, 32:, 32:] = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before, after = stem(images), stem(repainted)  # [2, 64, 16, 16], stride 4
    assert before.shape == (2, 64, 16, 16)
    far = (after[:, :, :6, :6] - before[:, :, :6, :6]).abs().max().item()  # receptive fields end before pixel 32
    near = (after[:, :, 8:, 8:] - before[:, :, 8:, 8:]).abs().max().item()
    assert near > 1e-3
    if stem_norm == "layer":
        assert far == 0.0
    else:
        assert far > 1e-4
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(encoder.backbone.model.state_dict(), str(path))
    other = "group" if stem_norm == "layer" else "layer"
    ImageEncoder(ImageEncoderConfig(stem_norm=other, checkpoint=str(path)))  # strict load: same names
    # ... which is why stage 1 writes the stem into the file's metadata, and a mismatch is refused
    safetensors.torch.save_file(encoder.backbone.model.state_dict(), str(path), metadata={"stem_norm": stem_norm})
    ImageEncoder(ImageEncoderConfig(stem_norm=stem_norm, checkpoint=str(path)))
    with pytest.raises(ValueError, match=f"trained with stem_norm='{stem_norm}'.*set ImageEncoderConfig.stem_norm"):
        ImageEncoder(ImageEncoderConfig(stem_norm=other, checkpoint=str(path)))


def test_layer_stem_runs_channels_last_with_the_same_values_and_gradients() -> None:
    """The per-pixel LayerNorm stem reads its feature map as NHWC (``TimmViT.channels_last``), so
    its permutes are views; the encoder's output and every parameter's gradient are those of the
    plain NCHW layout, bit for bit."""
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(stem_norm="layer")).train()
    assert encoder.backbone.channels_last
    assert not ImageEncoder(ImageEncoderConfig(stem_norm="group")).backbone.channels_last
    images = torch.rand(3, 3, 64, 64)
    results = []
    for channels_last in (True, False):
        encoder.backbone.channels_last = channels_last
        encoder.zero_grad(set_to_none=True)
        tokens = encoder(images).tokens
        (tokens.square().mean() + tokens.mean()).backward()
        results.append((tokens.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (plain, plain_grads) = results
    assert torch.equal(fast, plain)
    assert fast_grads.keys() == plain_grads.keys() and "backbone.model.patch_embed.backbone.norm.weight" in fast_grads
    for name in plain_grads:
        assert torch.equal(fast_grads[name], plain_grads[name]), name


@pytest.mark.parametrize("side", [32, 16, 15])
def test_stem_max_pool_without_its_padded_copy_pools_the_same(side: int) -> None:
    """The layer stem's max-pool skips timm's -inf padded copy on even maps (``ceil_mode`` takes the
    same windows): the same values and input gradients as timm's ``MaxPool2dSame``, odd maps included."""
    from timm.layers.pool2d_same import MaxPool2dSame

    from encoders.image import _MaxPool2dSameNoCopy

    stem = ImageEncoder(ImageEncoderConfig(stem_norm="layer")).backbone.model.patch_embed.backbone
    assert type(stem.pool) is _MaxPool2dSameNoCopy
    torch.manual_seed(0)
    x = torch.randn(2, 4, side, side).round(decimals=1)  # ties: the argmax must be the same one
    grads = []
    for pool in (stem.pool, MaxPool2dSame(3, 2)):
        leaf = x.clone().requires_grad_(True)
        out = pool(leaf)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert grads[0][0].shape[-1] == math.ceil(side / 2)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
@pytest.mark.parametrize("size", [(64, 64), (37, 23)])
def test_direct_transform_equals_torchvisions_composed_pipeline(mode: str, size: tuple[int, int]) -> None:
    """``image_transform`` runs the composed torchvision steps directly: bit for bit the same
    tensor, for every mode, with and without a resize (64x64 is the built-in scenes' size)."""
    from encoders.preprocess import torchvision_image_transform

    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels).convert(mode)
    for train in (False, True):
        ours, reference = image_transform(64, train=train)(image), torchvision_image_transform(64, train=train)(image)
        assert type(ours) is torch.Tensor and ours.shape == reference.shape == (3, 64, 64)
        assert torch.equal(ours, reference)
    torch.manual_seed(0)
    jittered = image_transform(64, train=True, augment=True)(image)
    torch.manual_seed(0)
    assert torch.equal(jittered, torchvision_image_transform(64, train=True, augment=True)(image))


def test_a_hybrid_stem_is_recomputed_with_the_blocks_and_trains_the_same() -> None:
    """The default hybrid ViT: with its blocks recomputed its convolutional stem held 98 % of what the
    encoder saved for backward (64.6 of 65.7 MiB at batch 64); it is recomputed too, under its own
    parameter names (the checkpoint format is unchanged), with the same gradients."""
    import copy

    import timm

    from mm_llama.saved_tensors import saved_for_backward

    torch.manual_seed(0)
    config = ImageEncoderConfig()
    encoder = ImageEncoder(config).train()
    images = torch.randn(4, 3, config.image_size, config.image_size)
    params = list(encoder.parameters())
    saved, grads = {}, {}
    for enabled in (False, True):
        encoder.set_grad_checkpointing(enabled)
        encoder.zero_grad()
        loss, saved[enabled] = saved_for_backward(lambda: encoder(images).tokens.square().mean(), exclude=params)
        loss.backward()
        grads[enabled] = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    assert saved[True] < 0.1 * saved[False], saved  # the stem's maps no longer held
    assert grads[True].keys() == grads[False].keys() and any("patch_embed.backbone" in n for n in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    from encoders.image import _overrides

    sizes = _overrides(config, {"patch_size": "patch_size", "depth": "depth", "width": "embed_dim", "heads": "num_heads"})
    plain = timm.create_model(config.model_name, pretrained=False, num_classes=0, img_size=config.tile_size, **sizes)
    plain.prune_intermediate_layers(indices=len(plain.blocks), prune_head=True)
    assert list(encoder.backbone.model.state_dict()) == list(plain.state_dict())
    twin = copy.deepcopy(encoder)  # still recomputes, still the same function
    twin.zero_grad()
    twin(images).tokens.square().mean().backward()
    torch.testing.assert_close(twin.backbone.model.patch_embed.proj.weight.grad,
                               grads[True]["backbone.model.patch_embed.proj.weight"])
    import pickle

    restored = pickle.loads(pickle.dumps(encoder))  # whole, as torch.save(module) would
    assert type(restored) is type(encoder) and restored.backbone.model.patch_embed.recompute
    assert type(restored.backbone.model.patch_embed) is type(encoder.backbone.model.patch_embed)
    torch.testing.assert_close(restored(images).tokens, encoder(images).tokens)


def test_fsdp_wrappers_recompute_a_trained_hybrid_stem_with_the_blocks() -> None:
    """Under FSDP the model's own switch is off and AdapterFSDPStrategy wraps what
    ``checkpointed_blocks`` lists: a trained hybrid ViT's stem among them (it held 64.6 of the
    65.7 MiB the encoder saved at batch 64 with its blocks recomputed), a frozen one's not."""
    import copy

    from mm_llama.saved_tensors import saved_for_backward
    from mm_llama.training.scale import apply_recomputation, checkpointed_blocks

    torch.manual_seed(0)
    config = ImageEncoderConfig()
    plain = ImageEncoder(config).train()
    wrapped = copy.deepcopy(plain)
    stem = wrapped.backbone.model.patch_embed
    recomputed = checkpointed_blocks(wrapped)
    ids = {id(m) for m in recomputed}
    assert id(stem) in ids and all(id(block) in ids for block in wrapped.blocks())
    apply_recomputation(wrapped, ids)
    images = torch.randn(4, 3, config.image_size, config.image_size)
    saved = {}
    for name, encoder in (("plain", plain), ("wrapped", wrapped)):
        loss, saved[name] = saved_for_backward(lambda: encoder(images).tokens.square().mean(),
                                               exclude=list(encoder.parameters()))
        loss.backward()
    assert saved["wrapped"] < 0.1 * saved["plain"], saved
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    for p, q in zip(plain.parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    plain.requires_grad_(False)  # a frozen encoder saves nothing: nothing of it is recomputed
    assert checkpointed_blocks(plain) == []
