"""Speech encoder, adapter and fusion: front-end parity with torchaudio, rotary relative
positions, padding invariance, output lengths, the embedding-fusion layout, and the fused
model (gradients on speech parameters only, frozen LM untouched, batched generation equal
to one-by-one generation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchaudio

from adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig
from adapters.speech_fusion import splice_speech
from encoders.conformer import FrameStacking
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from encoders.speech_frontend import FrontEndConfig, LogMelFrontEnd
from mm_llama.data.examples import IGNORE_INDEX
from mm_llama.lm import load_language_model, parameters_digest
from mm_llama.model import CrossAttentionConfig, ModelConfig, MultimodalLlama
from mm_llama.rotary_attention import RotarySelfAttention
from mm_llama.speech_generation import generate_from_speech
from mm_llama.training.scale import compile_blocks_
from tests.test_generation import assert_logits_close

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SPEECH = SpeechEncoderConfig(dim=32, depth=2, heads=2, ffn_dim=64, dropout=0.0)
TINY_ADAPTER = SpeechAdapterConfig(dim=32, heads=2, ffn_dim=64, dropout=0.0)


def _speechlike(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * math.pi * 220 * t) * torch.rand(n, generator=g) + 0.05 * torch.randn(n, generator=g)


def test_log_mel_matches_torchaudio_melspectrogram():
    front = LogMelFrontEnd(FrontEndConfig())
    audio = torch.stack([_speechlike(16000, 0), _speechlike(16000, 1)])
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80, center=False, power=2.0,
        norm=None, mel_scale="htk",
    )(audio).clamp(min=1e-10).log().transpose(1, 2)  # [b, t, m]
    ours = front.log_mel(audio)
    assert ours.shape == reference.shape == (2, 98, 80)  # 1 + (16000 - 400) // 160 frames of 25 ms every 10 ms
    assert torch.allclose(ours, reference, atol=1e-3, rtol=1e-4)


def test_features_are_normalised_per_utterance_over_real_frames_only():
    front = LogMelFrontEnd().eval()
    audio = torch.zeros(2, 16000)
    audio[0] = _speechlike(16000, 0)
    audio[1, :8000] = 10 * _speechlike(8000, 1)  # louder and half as long
    feats, frames = front(audio, torch.tensor([16000, 8000]))
    assert frames.tolist() == [98, 48]
    for i, n in enumerate(frames.tolist()):
        real = feats[i, :n]
        assert real.mean(0).abs().max() < 1e-4 and (real.std(0, unbiased=False) - 1).abs().max() < 1e-2
        assert feats[i, n:].abs().sum() == 0


def test_specaugment_only_in_training():
    front = LogMelFrontEnd(FrontEndConfig(time_masks=2, time_mask_width=30, freq_masks=2, freq_mask_width=20))
    audio, lengths = _speechlike(16000, 0)[None], torch.tensor([16000])
    clean, _ = front.eval()(audio, lengths)
    assert torch.equal(front(audio, lengths)[0], clean)
    torch.manual_seed(1)
    masked, _ = front.train()(audio, lengths)
    assert (masked == 0).sum() > (clean == 0).sum() + 100


def test_rotary_scores_depend_only_on_relative_positions():
    attn = RotarySelfAttention(dim=32, n_heads=4)
    x = torch.randn(2, 10, 32)
    positions = torch.arange(10).expand(2, 10)
    base = attn.scores(x, positions)
    assert torch.allclose(base, attn.scores(x, positions + 37), atol=1e-4)
    stretched = attn.scores(x, positions * 2)  # relative distances change: scores must change
    assert (stretched - base).abs().max() > 1e-2


@pytest.mark.parametrize("backbone", ["conformer"])
def test_padded_batch_gives_each_utterance_its_unpadded_output(backbone):
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderConfig(backbone=backbone, dim=32, depth=2, heads=2, ffn_dim=64)).eval()
    adapter = SpeechAdapter(32, 24, TINY_ADAPTER).eval()
    long, short = _speechlike(12000, 0), _speechlike(5123, 1)
    audio = torch.zeros(2, 12000)
    audio[0], audio[1, :5123] = long, short
    batch = encoder(audio, torch.tensor([12000, 5123]))
    alone = encoder(short[None], torch.tensor([5123]))
    n = int(alone.mask.sum())
    assert batch.mask[1].sum() == n and alone.mask.all()
    assert torch.allclose(batch.tokens[1, :n], alone.tokens[0], atol=1e-4)
    assert batch.tokens[1, n:].abs().sum() == 0
    frames_batch, mask_batch = adapter(batch.tokens, batch.mask)
    frames_alone, mask_alone = adapter(alone.tokens, alone.mask)
    m = int(mask_alone.sum())
    assert int(mask_batch[1].sum()) == m == math.ceil(n / 2)
    assert torch.allclose(frames_batch[1, :m], frames_alone[0], atol=1e-4)


def _torchaudio_speech_model(tiny_lm_dir) -> MultimodalLlama:
    torch.manual_seed(0)
    cfg = ModelConfig(image_encoder=None, cross_attention=CrossAttentionConfig(layers=()),
                      trainable=("speech_encoder", "speech_adapter"),
                      speech_encoder=SpeechEncoderConfig(backbone="torchaudio_conformer", dim=32, depth=2, heads=2,
                                                         ffn_dim=64, dropout=0.0),
                      speech_adapter=SpeechAdapterConfig(fusion="embedding", dim=32, heads=2, ffn_dim=64, dropout=0.0))
    return MultimodalLlama(load_language_model(str(tiny_lm_dir)), cfg).train()


@pytest.mark.parametrize("how", ["model-switch", "fsdp-wrappers"])
def test_torchaudio_conformer_is_recomputed_and_its_batchnorm_counts_each_batch_once(tiny_lm_dir, how):
    """Recomputing a torchaudio layer runs its BatchNorm again in training mode; the second run's
    update of the running statistics is undone (mm_llama.recompute), through the model's own switch
    and through the wrappers AdapterFSDPStrategy puts around its recomputed blocks. Without that the
    count is 2 a step and the running mean moves twice."""
    from mm_llama.training.scale import apply_recomputation, checkpointed_blocks

    plain, model = _torchaudio_speech_model(tiny_lm_dir), _torchaudio_speech_model(tiny_lm_dir)
    layers = model.speech_encoder.blocks()
    assert layers == list(model.speech_encoder.backbone.conformer.conformer_layers) and len(layers) == 2
    assert all(layer in checkpointed_blocks(model) for layer in layers)  # recomputed under FSDP too
    if how == "model-switch":
        model.set_grad_checkpointing(True)
    else:
        apply_recomputation(model, {id(m) for m in checkpointed_blocks(model)})
    ran = []
    for layer in model.speech_encoder.modules():
        if isinstance(layer, torchaudio.models.conformer.ConformerLayer):
            layer.register_forward_pre_hook(lambda *_: ran.append(1))
    ids, labels, audio, lengths, _ = _batch(plain)
    grads = {}
    for m in (plain, model):
        for step in range(2):  # two steps' forwards and backwards (no optimizer step)
            torch.manual_seed(step)  # SpecAugment's masks, the same draws for both models
            m.speech_loss(ids, labels, audio, lengths).backward()
        grads[m] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()
                    if p.grad is not None}
    assert len(ran) == 2 * 2 * 2  # each layer: forward and recomputation, two steps
    norms = {m: [n for n in m.speech_encoder.modules() if isinstance(n, torch.nn.BatchNorm1d)] for m in (plain, model)}
    assert len(norms[model]) == 2 and [int(n.num_batches_tracked) for n in norms[model]] == [2, 2]
    for ours, reference in zip(norms[model], norms[plain]):
        torch.testing.assert_close(ours.running_mean, reference.running_mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(ours.running_var, reference.running_var, rtol=0, atol=1e-7)
    assert grads[model].keys() == grads[plain].keys() and any(n.startswith("speech_encoder.") for n in grads[plain])
    for name, grad in grads[plain].items():
        torch.testing.assert_close(grads[model][name], grad, rtol=0, atol=1e-6, msg=name)


def test_torchaudio_backbone_runs_torchaudios_conformer():
    """The backbone's own loop over torchaudio's layers (for recomputation) is torchaudio's forward."""
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderConfig(backbone="torchaudio_conformer", dim=32, depth=2, heads=2,
                                                ffn_dim=64, dropout=0.0)).train()
    x, lengths = torch.randn(3, 11, 32), torch.tensor([11, 7, 4])
    reference, _ = copy.deepcopy(encoder.backbone.conformer)(x, lengths)
    out = encoder.backbone(x, lengths)
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, :7], reference[1, :7], rtol=0, atol=0)
    assert out[1, 7:].abs().sum() == 0 and out[2, 4:].abs().sum() == 0


def test_torchaudio_conformer_baseline_encodes():
    encoder = SpeechEncoder(SpeechEncoderConfig(backbone="torchaudio_conformer", dim=32, depth=1, heads=2,
                                                ffn_dim=64)).eval()
    out = encoder(torch.stack([_speechlike(8000, 0), _speechlike(8000, 1)]), torch.tensor([8000, 6000]))
    assert out.tokens.shape == (2, 12, 32) and out.mask.sum(1).tolist() == [12, 9]  # 48 and 36 mel frames
    assert torch.isfinite(out.tokens).all() and out.tokens[1, 9:].abs().sum() == 0


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 7, 9, 13])
def test_stacking_and_adapter_conv_lengths_for_odd_lengths(t):
    stacking = FrameStacking(in_dim=3, out_dim=5, stride=4)
    out, lengths = stacking(torch.randn(1, t, 3), torch.tensor([t]))
    assert out.shape[1] == lengths.item() == math.ceil(t / 4)
    adapter = SpeechAdapter(5, 8, TINY_ADAPTER)
    frames, mask = adapter(torch.randn(1, t, 5), torch.ones(1, t, dtype=torch.bool))
    assert frames.shape[1] == int(mask.sum()) == math.ceil(t / 2) == SpeechAdapter.output_lengths(torch.tensor(t))


def test_encoder_output_lengths_match_its_masks():
    encoder = SpeechEncoder(TINY_SPEECH).eval()
    lengths = torch.tensor([16000, 4001, 1600, 399])  # 399 samples: shorter than one window → 1 frame
    out = encoder(torch.randn(4, 16000) * 0.1, lengths)
    assert out.mask.sum(1).tolist() == encoder.output_lengths(lengths).tolist() == [25, 6, 2, 1]  # 98, 23, 8, 1 mel frames


# ---------------------------------------------------------------- embedding-fusion layout


def test_splice_replaces_the_placeholder_and_keeps_labels_aligned():
    d, speech_id = 3, 99
    ids = torch.tensor([[5, 6, 99, 7, 8, 0], [5, 99, 7, 8, 9, 10]])  # row 0 right-padded by one
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, -100, -100, 8, -100], [-100, -100, -100, 8, 9, 10]])
    embeds = ids[..., None].float().expand(2, 6, d).clone()
    speech = -torch.arange(1, 9).float()[None, :, None].expand(2, 8, d).clone()  # frames -1, -2, ...
    speech_mask = torch.tensor([[True] * 4 + [False] * 4, [True] * 8])
    out = splice_speech(embeds, ids, speech_id, speech, speech_mask, attention_mask=attention, labels=labels)
    assert out.embeds.shape == (2, 13, d)  # row 1: 6 tokens - 1 + 8 frames
    assert out.embeds[0, :8, 0].tolist() == [5, 6, -1, -2, -3, -4, 7, 8]
    assert out.key_padding_mask.sum(1).tolist() == [8, 13] and not out.key_padding_mask[0, 8:].any()
    assert out.embeds[1, :, 0].tolist() == [5, -1, -2, -3, -4, -5, -6, -7, -8, 7, 8, 9, 10]
    assert out.speech_mask[0].nonzero().squeeze(1).tolist() == [2, 3, 4, 5]
    # Labels move with their tokens; speech frames and pads carry none.
    assert out.labels[0].tolist() == [-100] * 7 + [8] + [-100] * 5
    assert out.labels[1].tolist() == [-100] * 10 + [8, 9, 10]
    assert (out.labels[out.speech_mask] == IGNORE_INDEX).all()
    assert out.positions[1].tolist() == list(range(13)) and out.positions[0, :8].tolist() == list(range(8))


def test_splice_left_pads_for_generation_and_refuses_missing_placeholders():
    ids = torch.tensor([[0, 0, 5, 99, 7], [4, 5, 6, 99, 7]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    embeds = ids[..., None].float()
    speech = torch.full((2, 3, 1), -1.0)
    out = splice_speech(embeds, ids, 99, speech, torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                        attention_mask=attention, left_pad=True)
    assert out.embeds[:, :, 0].tolist() == [[0, 0, 0, 5, -1, -1, 7], [4, 5, 6, -1, -1, -1, 7]]
    assert out.positions[0].tolist() == [0, 0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="placeholders"):
        splice_speech(embeds, torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 99, 7]]), 99, speech,
                      torch.ones(2, 3, dtype=torch.bool), attention_mask=attention)


# ---------------------------------------------------------------- the fused model


def _speech_model(lm_dir, fusion: str) -> MultimodalLlama:
    torch.manual_seed(0)
    cross = CrossAttentionConfig(every=2, gate_init=0.5) if fusion == "cross_attention" else CrossAttentionConfig(
        layers=())
    trainable = ("speech_encoder", "speech_adapter") + (("cross_attention",) if fusion == "cross_attention" else ())
    cfg = ModelConfig(image_encoder=None, cross_attention=cross, trainable=trainable, speech_encoder=TINY_SPEECH,
                      speech_adapter=SpeechAdapterConfig(fusion=fusion, dim=32, heads=2, ffn_dim=64, dropout=0.0))
    return MultimodalLlama(load_language_model(str(lm_dir)), cfg)


def _batch(model: MultimodalLlama):
    tok, sid = model.lm.tokenizer, model.media_token_id("speech")
    prompt = tok.encode("<|im_start|>user\n") + [sid] + tok.encode("Transcribe the audio.<|im_end|>\n<|im_start|>assistant\n")
    answer = tok.encode("a red square") + [tok.stop_ids[0]]
    ids = torch.tensor([prompt + answer] * 2)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, len(prompt):] = ids[:, len(prompt):]
    audio = torch.stack([_speechlike(8000, 0), _speechlike(8000, 1)])
    return ids, labels, audio, torch.tensor([8000, 5000]), prompt


@pytest.mark.parametrize("fusion", ["embedding", "cross_attention"])
def test_only_speech_parameters_get_gradients_and_the_lm_is_unchanged(tiny_lm_dir, fusion):
    model = _speech_model(tiny_lm_dir, fusion)
    assert not hasattr(model, "image_encoder")
    digest = parameters_digest(model.lm)
    ids, labels, audio, lengths, _ = _batch(model)
    model.train()
    loss = model.speech_loss(ids, labels, audio, lengths)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if name.startswith("lm."):
            assert not p.requires_grad and p.grad is None, name
        elif model.is_trainable(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    groups = {model.group_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert groups == set(model.cfg.trainable)
    assert parameters_digest(model.lm) == digest


def test_checkpointing_recomputes_the_conformer_layers_with_the_same_gradients(tiny_lm_dir):
    model = _speech_model(tiny_lm_dir, "cross_attention").train()
    ids, labels, audio, lengths, _ = _batch(model)
    layers = model.speech_encoder.blocks()
    assert layers == list(model.speech_encoder.backbone.layers) and len(layers) == TINY_SPEECH.depth
    runs, grads = {}, {}
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        ran = []
        hooks = [layer.register_forward_pre_hook(lambda *_: ran.append(1)) for layer in layers]
        torch.manual_seed(0)  # SpecAugment's masks, the same draws both times
        model.speech_loss(ids, labels, audio, lengths).backward()
        for hook in hooks:
            hook.remove()
        runs[enabled] = len(ran)
        grads[enabled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert runs == {False: len(layers), True: 2 * len(layers)}
    assert any(n.startswith("speech_encoder.backbone.") for n in grads[True])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-6, msg=name)


def test_compiled_conformer_layers_are_captured_whole_and_train_the_same(tiny_lm_dir):
    """``compile_blocks_`` compiles the Conformer's layers after the LM's blocks; each is captured
    without a graph break (``fullgraph``, ``eager`` backend) and gives the same loss and gradients."""
    model = _speech_model(tiny_lm_dir, "cross_attention").train()
    ids, labels, audio, lengths, _ = _batch(model)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # SpecAugment's masks, the same draws both times
        loss = model.speech_loss(ids, labels, audio, lengths)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    torch._dynamo.reset()
    compiled = compile_blocks_(model, backend="eager", fullgraph=True)
    assert compiled[-TINY_SPEECH.depth:] == model.speech_encoder.blocks()
    compiled_loss, compiled_grads = run()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    assert compiled_grads.keys() == grads.keys() and any(n.startswith("speech_encoder.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fusion", ["embedding", "cross_attention"])
def test_batched_generation_equals_one_by_one(tiny_lm_dir, fusion):
    model = _speech_model(tiny_lm_dir, fusion).eval()
    *_, audio, lengths, prompt = _batch(model)
    prompts = [prompt, prompt[2:]]  # different lengths: left padding in the batch
    tok = model.lm.tokenizer
    kwargs = dict(max_new_tokens=5, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    together = generate_from_speech(model, prompts, audio, lengths, **kwargs)
    alone = [generate_from_speech(model, [p], audio[i:i + 1, : int(lengths[i])], lengths[i:i + 1], **kwargs)[0]
             for i, p in enumerate(prompts)]
    assert together == alone and all(len(x) > 0 for x in together)


@pytest.mark.parametrize("fusion", ["embedding", "cross_attention"])
def test_static_shape_decoding_gives_the_same_speech_transcripts(tiny_lm_dir, fusion):
    """The step CUDA graphs replay, run eagerly on CPU: the growing cache's tokens and logits, for both
    fusions (spliced speech embeddings and speech cross-attention), with left padding."""
    model = _speech_model(tiny_lm_dir, fusion).eval()
    *_, audio, lengths, prompt = _batch(model)
    prompts, tok = [prompt, prompt[2:]], model.lm.tokenizer
    runs = {}
    for static in (False, True):
        logits: list[torch.Tensor] = []
        ids = generate_from_speech(model, prompts, audio, lengths, max_new_tokens=6, pad_id=tok.pad_id,
                                   on_logits=logits.append, static_cache=static)
        runs[static] = ids, torch.stack(logits)
    assert runs[True][0] == runs[False][0]
    assert_logits_close(runs[True][1], runs[False][1], f"{fusion}, static vs growing cache:")
