"""Two-process Lightning DDP on CPU (gloo) over real WebDataset shards, against one process.

The DDP run (``tests/ddp_fit.py parallel``, its own process tree, so pytest is never forked) must show
that each rank reads its own shards, that both ranks take the same number of optimizer steps
although the shards hold different numbers of samples (``epoch_length``; unequal counts would
hang DDP, DESIGN §9), and that it trains exactly what one process trains on the same global
batches (``tests/ddp_fit.py reference``). The DDP run recomputes its blocks in backward
(``AdapterModule(activation_checkpointing=True)``) and the reference does not, so the comparison
also shows that activation checkpointing under DDP trains what plain training trains. The same run sharded with
:class:`~mm_llama.training.scale.AdapterFSDPStrategy` (FSDP runs on CPU over gloo too) must train
what DDP trains, and save a checkpoint of the full, unsharded trainable weights only; an FSDP run
stopped after an epoch and resumed from that checkpoint must continue exactly as if it had not stopped.
The speech and video paths get the DDP checks too (``--modality speech|video``: spoken or clip shards,
the tiny speech model or the tiny model with a video branch).

Why the two runs may be compared at all: DDP averages the ranks' gradients, each the gradient of
a mean over that rank's labelled tokens, while one process takes the mean over all labelled tokens
of the global batch. The two agree only when every rank has as many labelled tokens per step, so
every sample here has the same number of labelled tokens (checked when the shards are written).
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
import webdataset as wds

from mm_llama.data import clips, scenes, spoken
from mm_llama.data.clips import VIDEO_PLACEHOLDER, ClipSpec
from mm_llama.data.examples import DEFAULT_MEDIA_PLACEHOLDER, IGNORE_INDEX, encode_example
from mm_llama.data.speech_pipeline import SPEECH_PLACEHOLDER
from mm_llama.data.pipeline import DataConfig, train_batches_per_rank
from mm_llama.tokenizer import Tokenizer
from tests.ddp_fit import VAL_BATCHES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ddp_fit.py"
SHARD_SIZES = (4, 3, 3, 2)  # uneven on purpose: ranks get different numbers of samples
BATCH, EPOCH_LENGTH, WORLD = 2, 16, 2
TIMEOUT_S = 600  # a hang fails here (the ranks' process group times out after 120 s)

# Tolerances. fp32 sums in another order (gloo's all-reduce of two rank gradients vs one backward
# over the global batch) differ by a few ulps of the summands; where samples' gradients nearly cancel
# that is a larger relative error of the sum, and AdamW, which divides each element by its own
# running RMS, turns it into an update error of up to ~1e-3 * lr (measured on a busy 2-core CPU: max
# |diff| 1.25e-5 over all trainable weights after 4 steps at lr 1e-2; loss rel. diff < 1e-6). A real
# fault (a rank's samples missing from the average, gradients summed not averaged, ranks out of step)
# changes updates by O(lr) = 1e-2 per step: the bounds sit between the two, lr / 100 for weights.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4


def spoken_samples(n: int) -> list[dict]:
    """``spoken.make_sample(0, "train", i)`` for ``i < n``, synthesised in a fresh process: eSpeak's
    output jitters with a state that every synthesis in a process advances (``mm_llama/data/espeak.py``),
    so in this process the samples would depend on which tests ran before (and the runs with them:
    one weight's DDP-vs-one-process difference was 1.0e-4 after the other test modules, 9.9e-6 alone)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_spoken_samples, n).result()


def _spoken_samples(n: int) -> list[dict]:
    return [spoken.make_sample(0, "train", i) for i in range(n)]


def write_equal_label_shards(root: Path, lm_dir: Path, modality: str = "image") -> list[Path]:
    """Shards of :data:`SHARD_SIZES` samples (shape scenes, or spoken sentences and questions) whose
    examples all have the same number of labelled tokens under the tiny LM's tokenizer (the most
    common count among the first 200 samples)."""
    tok = Tokenizer.from_hf_dir(lm_dir)
    placeholder = {"speech": SPEECH_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}.get(modality, DEFAULT_MEDIA_PLACEHOLDER)

    def n_labels(sample: dict) -> int:
        meta = json.loads(sample["json"])
        enc = encode_example(tok, meta["prompt"], meta["response"], media_placeholder=placeholder,
                             media_token_id=tok.vocab_size, system="")
        return int((enc["labels"] != IGNORE_INDEX).sum())

    if modality == "speech":
        candidates = spoken_samples(200)
    elif modality == "video":
        candidates = [clips.make_clip_sample(0, "train", i, ClipSpec(size=16)) for i in range(200)]
    else:
        candidates = [scenes.make_sample(0, "train", i, image_size=16) for i in range(200)]
    counts = [n_labels(s) for s in candidates]
    target = collections.Counter(counts).most_common(1)[0][0]
    chosen = iter([s for s, n in zip(candidates, counts) if n == target])
    paths = []
    for shard, size in enumerate(SHARD_SIZES):
        path = root / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                sink.write(next(chosen))
        paths.append(path)
    return paths


def run_scripts(*runs: list[str], expect_failure: bool | tuple[bool, ...] = False) -> list[str]:
    """Run ``tests/ddp_fit.py`` once per argument list, all at once; fail naming any that fails or hangs
    (``expect_failure``, for all runs or one flag a run: any that succeeds). Returns each run's standard error."""
    failures = expect_failure if isinstance(expect_failure, tuple) else (expect_failure,) * len(runs)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a fresh job, whatever launched pytest
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for args in runs]
    errors = []
    for args, proc, should_fail in zip(runs, procs, failures, strict=True):
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{SCRIPT.name} {' '.join(args)} did not finish in {TIMEOUT_S} s (ranks out of step?)")
        assert (proc.returncode != 0) == should_fail, f"{SCRIPT.name} {' '.join(args)} exited {proc.returncode}:\n{stderr[-4000:]}"
        errors.append(stderr)
    return errors


@pytest.fixture(scope="module")
def runs(tiny_lm_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    shards = write_equal_label_shards(root, tiny_lm_dir)
    urls = "::".join(map(str, shards))
    common = ["--lm", str(tiny_lm_dir), "--shards", urls]
    parallel = [*common, "--devices", str(WORLD), "--batch-size", str(BATCH), "--epoch-length", str(EPOCH_LENGTH),
                "--validate"]
    run_scripts(["parallel", *parallel, "--out", str(root / "ddp"), "--activation-checkpointing"])
    # the reference needs the DDP run's batches; FSDP runs beside it
    run_scripts(["reference", *common, "--out", str(root / "ref"), "--ranks-from", str(root / "ddp")],
                ["parallel", *parallel, "--out", str(root / "fsdp"), "--strategy", "fsdp"])
    return {"ddp": root / "ddp", "ref": root / "ref", "fsdp": root / "fsdp", "shards": shards}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trainable weights in the checkpoint a run saved after training, by parameter name."""
    state = torch.load(out / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def ranks(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])


def test_each_rank_reads_its_own_shards(runs):
    records = ranks(runs["ddp"])
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == WORLD for r in records)
    shards = [{url for step in r["steps"] for url in step["urls"]} for r in records]
    keys = [{key for step in r["steps"] for key in step["keys"]} for r in records]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {str(p) for p in runs["shards"]}  # every shard has a reader
    assert not keys[0] & keys[1]


def test_both_ranks_take_the_same_number_of_steps(runs):
    records = ranks(runs["ddp"])
    samples = [len({key for step in r["steps"] for key in step["keys"]}) for r in records]
    assert samples[0] != samples[1]  # the shards give the ranks unequal data...
    expected = train_batches_per_rank(DataConfig(train_urls="x", batch_size=BATCH, epoch_length=EPOCH_LENGTH), WORLD)
    # ...yet epoch_length gives both the same steps, each a full batch
    assert [r["global_step"] for r in records] == [expected, expected]
    assert all(len(r["steps"]) == expected and all(len(s["keys"]) == BATCH for s in r["steps"]) for r in records)


def test_each_rank_draws_from_its_own_random_streams(runs):
    """Every rank is seeded alike (the same initial weights), then given its own streams when training
    starts: dropout and SpecAugment masks differ between ranks' samples (before: the same states)."""
    records = ranks(runs["ddp"])
    assert records[0]["streams"]["torch"] != records[1]["streams"]["torch"]
    assert records[0]["streams"]["python"] != records[1]["streams"]["python"]


def assert_trains_like_one_process(parallel: Path, reference: Path) -> set[str]:
    """The one-process ``reference`` run took, step by step, the union of the ``parallel`` run's rank
    batches, with the mean of their losses, and ended with its weights; returns the weights' names."""
    ddp, (ref,) = ranks(parallel), ranks(reference)
    n_steps = len(ddp[0]["steps"])
    assert n_steps and ref["global_step"] == n_steps
    assert [s["keys"] for s in ref["steps"]] == [ddp[0]["steps"][k]["keys"] + ddp[1]["steps"][k]["keys"]
                                                 for k in range(n_steps)]
    mean_of_ranks = torch.tensor([(ddp[0]["steps"][k]["loss"] + ddp[1]["steps"][k]["loss"]) / 2
                                  for k in range(n_steps)])
    global_loss = torch.tensor([s["loss"] for s in ref["steps"]], dtype=mean_of_ranks.dtype)
    torch.testing.assert_close(global_loss, mean_of_ranks, rtol=LOSS_RTOL, atol=0)

    init = torch.load(parallel / "init.pt")
    trained, one_process = final_weights(parallel), final_weights(reference)
    assert set(trained) == set(one_process) == set(init)
    moved = max((trained[k].float() - init[k].float()).abs().max().item() for k in init)
    diff = max((trained[k].float() - one_process[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3, f"training barely moved the weights (max change {moved:.2e}): the comparison is void"
    assert diff <= WEIGHT_ATOL, f"DDP and one process differ by {diff:.2e} (> {WEIGHT_ATOL}); weights moved {moved:.2e}"
    return set(init)


def test_ddp_trains_what_one_process_trains_on_the_global_batch(runs):
    ddp, (ref,) = ranks(runs["ddp"]), ranks(runs["ref"])
    assert [r["activation_checkpointing"] for r in (*ddp, ref)] == [True, True, False]  # recomputed vs plain
    assert_trains_like_one_process(runs["ddp"], runs["ref"])


MEDIA = ("speech", "video")


@pytest.fixture(scope="module")
def media_runs(tiny_lm_dir, tmp_path_factory) -> dict[str, dict]:
    """The speech and video paths under DDP, each against one process on its global batches: the two
    DDP runs side by side, then the two references beside the same runs under FSDP (blocks recomputed)."""
    setups = {}
    for modality in MEDIA:
        root = tmp_path_factory.mktemp(modality)
        shards = write_equal_label_shards(root, tiny_lm_dir, modality=modality)
        common = ["--modality", modality, "--lm", str(tiny_lm_dir), "--shards", "::".join(map(str, shards))]
        setups[modality] = {"root": root, "shards": shards, "common": common}
    run_scripts(*[["parallel", *m["common"], "--devices", str(WORLD), "--batch-size", str(BATCH),
                   "--epoch-length", str(EPOCH_LENGTH), "--out", str(m["root"] / "ddp")] for m in setups.values()])
    run_scripts(*[["reference", *m["common"], "--out", str(m["root"] / "ref"), "--ranks-from", str(m["root"] / "ddp")]
                  for m in setups.values()],
                *[["parallel", *m["common"], "--devices", str(WORLD), "--batch-size", str(BATCH),
                   "--epoch-length", str(EPOCH_LENGTH), "--out", str(m["root"] / "fsdp"), "--strategy", "fsdp"]
                  for m in setups.values()])  # the strategy recomputes the blocks by default
    return setups


@pytest.mark.parametrize("modality", MEDIA)
def test_speech_and_video_under_ddp_train_what_one_process_trains(media_runs, modality):
    """Speech: waveforms of different lengths, padded per rank's batch in the DDP run and per global
    batch in the reference, through the tiny cross-attention speech model (Conformer, adapter and
    cross-attention training). Video: clips through the tiny model with a video branch. The same checks
    as the image run's: disjoint shards, the same steps on unequal data, the reference's losses and weights."""
    root, shards = media_runs[modality]["root"], media_runs[modality]["shards"]
    ddp = ranks(root / "ddp")
    opened = [{url for step in r["steps"] for url in step["urls"]} for r in ddp]
    assert not opened[0] & opened[1] and opened[0] | opened[1] == {str(p) for p in shards}
    samples = [len({key for step in r["steps"] for key in step["keys"]}) for r in ddp]
    assert samples[0] != samples[1]  # unequal data, yet the same steps on both ranks:
    assert len({r["global_step"] for r in ddp} | {len(r["steps"]) for r in ddp}) == 1
    names = assert_trains_like_one_process(root / "ddp", root / "ref")
    branch = {"speech": "speech_encoder.", "video": "video."}[modality]
    assert any(name.startswith(branch) for name in names)


@pytest.mark.parametrize("modality", MEDIA)
def test_speech_and_video_under_fsdp_train_what_ddp_trains(media_runs, modality):
    """The speech and video runs sharded with ``AdapterFSDPStrategy``, their blocks recomputed: the same
    samples, losses and weights as under DDP, a checkpoint of the whole trainable weights, and the
    branch's blocks (Conformer layers; the video branch's cross-attention blocks) FSDP units of their own
    that are recomputed in backward."""
    root = media_runs[modality]["root"]
    assert_trains_like_ddp(root / "ddp", root / "fsdp")
    layout = json.loads((root / "fsdp" / "fsdp_layout.json").read_text())
    branch = {"speech": r"model\.speech_encoder\..*layers\.\d+", "video": r"model\.video\.cross_attn\.\d+"}[modality]
    blocks = [name for name in layout["units"] if re.fullmatch(branch, name)]
    assert blocks and set(blocks) <= set(layout["recomputed"]), layout


def assert_trains_like_ddp(ddp_out: Path, fsdp_out: Path) -> None:
    """The FSDP run took the DDP run's samples step by step, with its losses, and saved its trainable
    weights whole (gathered, not 1-D shards; nothing of the frozen LM)."""
    ddp, fsdp = ranks(ddp_out), ranks(fsdp_out)
    # the same data module on the same ranks: the same samples, step by step
    assert [[s["keys"] for s in r["steps"]] for r in fsdp] == [[s["keys"] for s in r["steps"]] for r in ddp]
    for a, b in zip(ddp, fsdp):
        torch.testing.assert_close(torch.tensor([s["loss"] for s in b["steps"]]),
                                   torch.tensor([s["loss"] for s in a["steps"]]), rtol=LOSS_RTOL, atol=0)
    init = torch.load(fsdp_out / "init.pt")
    sharded, replicated = final_weights(fsdp_out), final_weights(ddp_out)
    assert set(sharded) == set(init)  # only what trains, nothing of the frozen LM
    assert all(sharded[k].shape == init[k].shape for k in init)  # gathered, not 1-D shards
    diff = max((sharded[k].float() - replicated[k].float()).abs().max().item() for k in init)
    assert diff <= WEIGHT_ATOL, f"FSDP and DDP differ by {diff:.2e} (> {WEIGHT_ATOL})"


def test_fsdp_trains_what_ddp_trains_and_saves_whole_trainable_weights(runs):
    assert_trains_like_ddp(runs["ddp"], runs["fsdp"])
    # Saving gathered the units that hold those weights, and none of the frozen LM's.
    gathered = json.loads((runs["fsdp"] / "gathered_units.json").read_text())
    assert any(".cross_attn." in name for name in gathered) and "model.image_encoder" in gathered
    assert not [name for name in gathered if name == "" or name.startswith("model.lm.")], gathered
    # Each ViT block of the encoder, which trains here, is a unit of its own and recomputed in backward,
    # like every decoder and cross-attention block.
    layout = json.loads((runs["fsdp"] / "fsdp_layout.json").read_text())
    vit_blocks = [f"model.image_encoder.backbone.model.blocks.{i}" for i in range(2)]
    assert set(vit_blocks) <= set(layout["units"]) and "model.image_encoder" in layout["units"]
    lm_side = [name for name in layout["units"] if re.fullmatch(r"model\.(lm\.layers|cross_attn)\.\d+", name)]
    assert len(lm_side) > 4 and sorted(layout["recomputed"]) == sorted(vit_blocks + lm_side), layout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_validation_summarises_every_rank_on_every_rank(runs, strategy):
    """Each rank validates its own shards (at most VAL_BATCHES batches); the metrics cover all of them.

    Under FSDP this also shows that validation, generation included, keeps the ranks in step.
    """
    per_rank = [min(sum(SHARD_SIZES[r::WORLD]), VAL_BATCHES * BATCH) for r in range(WORLD)]  # shards in order
    assert per_rank[0] != per_rank[1]
    metrics = [r["val"] for r in ranks(runs[strategy])]
    assert metrics[0] == metrics[1] and metrics[0]["n"] == sum(per_rank)


def test_fsdp_on_one_process_saves_what_one_process_trains(tiny_lm_dir, tmp_path):
    """One GPU with an FSDP config: FSDP falls back to ``NO_SHARD``, whose full-state-dict hook
    failed on the root unit's frozen LM weights (seen on an H100). The checkpoint must come out
    whole and equal to a plain one-process run's."""
    shards = write_equal_label_shards(tmp_path, tiny_lm_dir)
    common = ["parallel", "--lm", str(tiny_lm_dir), "--shards", "::".join(map(str, shards)), "--devices", "1",
              "--batch-size", str(BATCH), "--epoch-length", str(EPOCH_LENGTH)]
    run_scripts([*common, "--out", str(tmp_path / "ddp")], [*common, "--out", str(tmp_path / "fsdp"), "--strategy", "fsdp"])
    init = torch.load(tmp_path / "fsdp" / "init.pt")
    sharded, plain = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "ddp")
    assert set(sharded) == set(plain) == set(init)
    moved = max((sharded[k].float() - init[k].float()).abs().max().item() for k in init)
    diff = max((sharded[k].float() - plain[k].float()).abs().max().item() for k in init)
    assert moved > 1e-3, f"training barely moved the weights (max change {moved:.2e}): the comparison is void"
    assert diff <= WEIGHT_ATOL, f"one-process FSDP and DDP differ by {diff:.2e} (> {WEIGHT_ATOL})"


def test_fsdp_run_resumed_from_its_checkpoint_continues_exactly(tiny_lm_dir, tmp_path):
    """Two FSDP ranks train two epochs; the same run stopped after one ("crashed") and resumed from
    its checkpoint takes the same steps on the same samples with the same losses and ends with the
    same weights, within 1e-5.

    Two faults were behind this: Lightning's loading of a one-file checkpoint under FSDP refused the
    frozen dataclasses in the hyper-parameters, and FSDP on a CPU saved every AdamW state as
    ``exp_avg_sq`` (``AdapterFSDPStrategy.optimizer_state``): the resumed run then diverged from its
    second step (losses 10.5 against 9.4)."""
    shards = write_equal_label_shards(tmp_path, tiny_lm_dir)
    common = ["parallel", "--lm", str(tiny_lm_dir), "--shards", "::".join(map(str, shards)), "--devices", str(WORLD),
              "--batch-size", str(BATCH), "--epoch-length", str(EPOCH_LENGTH), "--strategy", "fsdp", "--epochs", "2"]
    run_scripts([*common, "--out", str(tmp_path / "whole")], [*common, "--stop-after", "1", "--out", str(tmp_path / "first")])
    # The resumed run, and beside it one from a checkpoint cut short (a kill during a copy): refused by name.
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((tmp_path / "first" / "final.ckpt").read_bytes()[:4096])
    _, stderr = run_scripts([*common, "--resume-from", str(tmp_path / "first" / "final.ckpt"), "--out", str(tmp_path / "resumed")],
                            [*common, "--resume-from", str(cut), "--out", str(tmp_path / "cut")], expect_failure=(False, True))
    assert f"checkpoint {cut} cannot be read" in stderr, stderr[-2000:]
    whole, first, resumed = ranks(tmp_path / "whole"), ranks(tmp_path / "first"), ranks(tmp_path / "resumed")
    for w, f, r in zip(whole, first, resumed):
        n = len(f["steps"])
        assert n and len(w["steps"]) == 2 * n and r["global_step"] == w["global_step"] == 2 * n
        assert [s["keys"] for s in r["steps"]] == [s["keys"] for s in w["steps"][n:]]
        torch.testing.assert_close(torch.tensor([s["loss"] for s in r["steps"]]),
                                   torch.tensor([s["loss"] for s in w["steps"][n:]]), rtol=0, atol=1e-5)
    state = torch.load(tmp_path / "first" / "final.ckpt", map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert not any(torch.equal(s["exp_avg"], s["exp_avg_sq"]) for s in state["state"].values())
    after, reference = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "whole")
    moved = max((reference[k] - v).abs().max().item() for k, v in final_weights(tmp_path / "first").items())
    assert moved > 1e-3, "the second epoch barely moved the weights: the comparison is void"
    assert max((after[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5
