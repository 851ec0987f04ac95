"""The WebDataset pipeline on real tar shards in ``tmp_path``: coverage, rank/worker
splits, epoch-seeded shuffling, corrupt samples, missing shards, batching."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest
import torch
import webdataset as wds

from mm_llama.data import pipeline, scenes
from mm_llama.data.collate import collate
from mm_llama.data.examples import CAPTION_PROMPT, IGNORE_INDEX
from mm_llama.data.pipeline import (
    DataConfig,
    SkipCounter,
    build_dataset,
    build_loader,
    resolve_urls,
    samples_per_worker,
    train_batches_per_rank,
)
from tests.test_data_examples import chat_tokenizer  # the tiny ChatML BPE tokenizer

N_SHARDS, PER_SHARD = 4, 12
KEYS = {f"{i:08d}" for i in range(N_SHARDS * PER_SHARD)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shards")
    scenes.write_shards(root, "train", N_SHARDS * PER_SHARD, PER_SHARD, seed=0, image_size=32, progress=False)
    return str(root / f"train-{{000000..{N_SHARDS - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def corrupt_shard(tmp_path_factory) -> tuple[str, set[str], dict[str, int]]:
    """One shard mixing good samples with every kind of corrupt one."""
    path = tmp_path_factory.mktemp("corrupt") / "mixed-000000.tar"
    good = [{**scenes.make_sample(1, "train", i, image_size=32), "__key__": f"good{i}"} for i in range(6)]
    png = good[0]["png"]

    def meta(prompt: str, response: str) -> bytes:
        return json.dumps({"prompt": prompt, "response": response}).encode()

    bad = [
        {"__key__": "bad_png", "png": b"\x89PNG\r\n\x1a\nnot really", "json": meta("Describe the image.", "red")},
        {"__key__": "truncated_png", "png": png[: len(png) // 2], "json": meta("Describe the image.", "red")},
        {"__key__": "no_text", "png": png},
        {"__key__": "no_image", "json": meta("Describe the image.", "red")},
        {"__key__": "empty_response", "png": png, "json": meta("Describe the image.", "  ")},
        {"__key__": "no_prompt", "png": png, "json": json.dumps({"response": "red"}).encode()},
        {"__key__": "latin1_txt", "png": png, "txt": "a r\xe9d square".encode("latin-1")},
        {"__key__": "broken_json", "png": png, "json": b'{"prompt": "Describe'},
        {"__key__": "list_json", "png": png, "json": b"[1, 2]"},
        {"__key__": "too_long", "png": png, "json": meta("Describe the image. " * 40, "red")},
        {"__key__": "placeholder", "png": png, "json": meta("Is <|image|> red?", "yes")},
    ]
    txt_caption = {"__key__": "txt_caption", "png": png, "txt": "A red square in the top left.".encode()}
    samples = good[:3] + bad[:6] + [txt_caption] + good[3:] + bad[6:]
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    expected = {
        "bad_image": 2, "missing_text": 1, "missing_image": 1, "empty_text": 2, "bad_encoding": 1,
        "bad_json": 2, "too_long": 1, "bad_text": 1,
    }  # fmt: skip
    return str(path), {s["__key__"] for s in good} | {"txt_caption"}, expected


def make_dataset(urls, *, train: bool, **overrides):
    cfg = DataConfig(train_urls=urls, image_size=32, shuffle_buffer=16, **overrides)
    tok = chat_tokenizer()
    return build_dataset(urls, tok, None, tok.vocab_size, train=train, cfg=cfg)


def keys(dataset, epoch: int = 0) -> list[str]:
    dataset.set_epoch(epoch)
    return [s["meta"]["__key__"] for s in dataset]


def test_eval_reads_every_sample_once_in_order(shards):
    dataset = make_dataset(shards, train=False)
    samples = list(dataset)
    assert [s["meta"]["__key__"] for s in samples] == sorted(KEYS)
    sample = samples[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["input_ids"].dtype == torch.long and sample["labels"].shape == sample["input_ids"].shape
    assert (sample["input_ids"] == chat_tokenizer().vocab_size).sum() == 1
    assert {"prompt", "response", "task", "heldout", "objects"} <= set(sample["meta"])
    assert dataset.counter.total == 0


def test_train_epoch_covers_every_sample_once(shards):
    dataset = make_dataset(shards, train=True)
    for epoch in range(2):
        got = keys(dataset, epoch)
        assert len(got) == len(KEYS) and set(got) == KEYS


def test_epoch_seeded_shuffle(shards):
    a, b = make_dataset(shards, train=True), make_dataset(shards, train=True)
    assert keys(a, 0) == keys(b, 0)  # reproducible
    assert keys(a, 1) == keys(b, 1)
    assert keys(a, 0) != keys(a, 1)  # reshuffled per epoch
    assert keys(a, 0) != sorted(KEYS)
    assert keys(make_dataset(shards, train=True, seed=1), 0) != keys(a, 0)


@pytest.mark.parametrize("train", [False, True])
def test_ranks_and_workers_partition(shards, monkeypatch, train):
    """2 ranks x 2 workers (wds reads RANK/WORLD_SIZE/WORKER/NUM_WORKERS from the environment)."""
    seen = []
    for rank in range(2):
        for worker in range(2):
            for name, value in [("RANK", rank), ("WORLD_SIZE", 2), ("WORKER", worker), ("NUM_WORKERS", 2)]:
                monkeypatch.setenv(name, str(value))
            seen.append(keys(make_dataset(shards, train=train, num_workers=2), epoch=3))
    assert all(len(part) == PER_SHARD for part in seen)  # one shard each
    assert sorted(k for part in seen for k in part) == sorted(KEYS)  # disjoint and complete


def test_resampled_epoch_length(shards, monkeypatch):
    dataset = make_dataset(shards, train=True, resampled=True, epoch_length=20, batch_size=4)
    first = keys(dataset, 0)
    assert len(first) == 20 and set(first) <= KEYS
    assert keys(dataset, 0) == first and keys(dataset, 1) != first  # reproducible, reseeded per epoch
    # with_epoch counts per worker: ceil(20 / (2 ranks * 3 workers * 4)) * 4 = 4 samples, 3 batches per rank.
    cfg = DataConfig(shards, resampled=True, epoch_length=20, batch_size=4, num_workers=3)
    assert samples_per_worker(cfg, world_size=2) == 4 and train_batches_per_rank(cfg, world_size=2) == 3
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other_rank = keys(make_dataset(shards, train=True, resampled=True, epoch_length=20, batch_size=4))
    assert len(other_rank) == 12 and other_rank != first[:12]  # ceil(20 / (2 * 4)) * 4


def test_corrupt_samples_skipped_and_counted(corrupt_shard, caplog):
    url, good_keys, expected = corrupt_shard
    dataset = make_dataset(url, train=False, max_len=96)
    with caplog.at_level(logging.WARNING, logger="mm_llama.data.pipeline"):
        samples = list(dataset)
    assert sorted(s["meta"]["__key__"] for s in samples) == sorted(good_keys)
    counts = dataset.counter.counts()
    assert {k: v for k, v in counts.items() if v} == expected
    assert "bad_png" in caplog.text and "bad_image" in caplog.text
    (txt,) = [s for s in samples if s["meta"]["__key__"] == "txt_caption"]
    assert txt["meta"]["prompt"] == CAPTION_PROMPT and txt["meta"]["response"] == "A red square in the top left."


def test_encodings_are_memoised_per_text_and_every_sample_gets_its_own_tensors(shards, monkeypatch):
    dataset = make_dataset(shards, train=False)
    first = list(dataset)
    encoded = []
    real = pipeline.encode_example
    monkeypatch.setattr(pipeline, "encode_example", lambda *a, **k: encoded.append(a[1:3]) or real(*a, **k))
    for sample in first:  # a consumer writing into its samples must not reach the cache
        sample["input_ids"].zero_()
        sample["labels"].zero_()
    second = list(dataset)
    assert encoded == []  # the second pass re-encoded no text
    monkeypatch.setattr(pipeline, "encode_example", real)
    for cached, fresh in zip(second, make_dataset(shards, train=False), strict=True):
        assert torch.equal(cached["input_ids"], fresh["input_ids"]) and torch.equal(cached["labels"], fresh["labels"])


def test_corrupt_texts_are_not_memoised_but_counted_every_time(corrupt_shard):
    url, good_keys, expected = corrupt_shard
    dataset = make_dataset(url, train=False, max_len=96)
    for _ in range(2):
        assert sorted(s["meta"]["__key__"] for s in dataset) == sorted(good_keys)
    assert {k: v for k, v in dataset.counter.counts().items() if v} == {k: 2 * v for k, v in expected.items()}


def test_unreadable_shard_is_counted_not_fatal(shards, tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    dataset = make_dataset(f"{garbage}::{shards}", train=False)
    assert sorted(keys(dataset)) == sorted(KEYS)
    assert dataset.counter["read_error"] == 1


def test_missing_shard_raises_before_training(shards, tmp_path):
    missing = str(tmp_path / "train-{000000..000001}.tar")
    with pytest.raises(FileNotFoundError, match="train-000000.tar"):
        make_dataset(missing, train=True)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        resolve_urls([shards, str(tmp_path / "nope.tar")])
    with pytest.raises(ValueError, match="no shard URLs"):
        resolve_urls([])
    assert resolve_urls("pipe:cat /x/a-{0..1}.tar::https://host/b.tar") == [
        "pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar", "https://host/b.tar",
    ]  # fmt: skip
    assert resolve_urls(f"file://{shards.replace('{000000..000003}', '000001')}")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the 404s the tests ask for are expected; keep the log clean
        pass


@contextlib.contextmanager
def serving(handler_class: type, directory: str) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``directory`` through ``handler_class`` from a thread; shut down after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_class, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)  # port 0 above: an ephemeral port
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def http_root(shards):
    """``http://127.0.0.1:PORT`` serving the directory of ``shards`` from a thread; shut down after."""
    with serving(QuietHandler, os.path.dirname(shards)) as root:
        yield root


def samples_of(urls: str, train: bool) -> list[dict]:
    dataset = make_dataset(urls, train=train)
    dataset.set_epoch(1)
    samples = list(dataset)
    assert dataset.counter.total == 0
    return samples


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("train", [False, True])
def test_remote_urls_read_the_same_samples_as_local_paths(shards, http_root, train):
    """``http://`` (webdataset streams it through curl) and ``pipe:cat`` give the local samples, in the
    same order (shard and sample shuffles are seeded, not tied to the URL strings)."""
    local = samples_of(shards, train)
    name = os.path.basename(shards)
    for urls in (f"{http_root}/{name}", f"pipe:cat {shards}"):
        remote = samples_of(urls, train)
        assert [s["meta"]["__key__"] for s in remote] == [s["meta"]["__key__"] for s in local], urls
        assert len(remote) == len(KEYS)
        for a, b in zip(remote, local):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image"], b["image"])
            assert a["meta"]["__url__"] != b["meta"]["__url__"]  # really read through the remote URL


@pytest.mark.usefixtures("one_thread")
def test_missing_remote_shard_is_skipped_counted_and_named(shards, http_root, caplog):
    """A 404 is found only when the shard is read (no request is made up front), so it is treated
    like an unreadable local shard: skipped, counted as ``read_error``, logged with its URL."""
    name = os.path.basename(shards)
    missing_http = f"{http_root}/train-000099.tar"
    missing_pipe = f"pipe:cat {os.path.dirname(shards)}/train-000098.tar"
    dataset = make_dataset(f"{http_root}/{name}::{missing_http}::{missing_pipe}", train=False)
    with caplog.at_level(logging.WARNING, logger="mm_llama.data.pipeline"):
        assert sorted(keys(dataset)) == sorted(KEYS)
    assert dataset.counter.counts()["read_error"] == 2 and dataset.counter.total == 2
    (http_line,) = [r.getMessage() for r in caplog.records if missing_http in r.getMessage()]
    assert "curl failed (exit status 22 (HTTP error, e.g. 404 Not Found))" in http_line
    (pipe_line,) = [r.getMessage() for r in caplog.records if missing_pipe in r.getMessage()]
    assert "cat failed (exit status 1)" in pipe_line and "Pipe object" not in pipe_line


@pytest.fixture(scope="module")
def flaky_root(shards):
    """``http://127.0.0.1:PORT`` serving the shards, except that the first request for
    ``train-000001.tar`` (per query string) sends half the file under a whole file's length and
    drops the connection, as a storage node restarting mid-transfer does."""
    requests: dict[str, int] = {}

    class CuttingHandler(QuietHandler):
        def do_GET(self):
            requests[self.path] = requests.get(self.path, 0) + 1
            if "train-000001.tar" not in self.path or requests[self.path] > 1:
                return super().do_GET()
            data = open(os.path.join(os.path.dirname(shards), "train-000001.tar"), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    with serving(CuttingHandler, os.path.dirname(shards)) as root:
        yield root


@pytest.mark.usefixtures("one_thread")
def test_a_remote_shard_broken_part_way_is_read_again_from_where_it_broke(shards, flaky_root, caplog):
    """curl retries a failed request, not a transfer that broke after its first bytes: the shard
    is opened again and the samples it had delivered are passed over. Every sample once, in order,
    nothing counted as skipped; without retries the shard is a read_error and the samples before
    the break are still kept."""
    urls = "::".join(f"{flaky_root}/train-{i:06d}.tar?run=retried" for i in range(N_SHARDS))
    dataset = make_dataset(urls, train=False)
    with caplog.at_level(logging.WARNING, logger="mm_llama.data.shard_reader"):
        assert keys(dataset) == sorted(KEYS)
    assert dataset.counter.total == 0 and dataset.counter.retries == 1
    (line,) = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    delivered = int(line.split("broke after ")[1].split()[0])
    assert 0 < delivered < PER_SHARD and "retry 1 of 3" in line

    urls = urls.replace("run=retried", "run=not-retried")
    dataset = make_dataset(urls, train=False, shard_retries=0)
    got = keys(dataset)
    # The shard is a read_error; the sample the break cut into is passed on with what was read of
    # it (as webdataset's reader does) and counted by the decode stage for the part it lacks.
    assert dataset.counter.counts()["read_error"] == 1 and dataset.counter.total <= 2
    assert dataset.counter.retries == 0
    cut = sorted(KEYS)[PER_SHARD : 2 * PER_SHARD]
    kept = [k for k in got if k in cut]
    assert 0 < len(kept) < PER_SHARD and kept == cut[: len(kept)]  # the samples before the break
    assert got == [k for k in sorted(KEYS) if k not in cut or k in kept]
    with pytest.raises(ValueError, match="shard_retries must be >= 0"):
        make_dataset(urls, train=False, shard_retries=-1)


@pytest.mark.usefixtures("one_thread")
def test_a_failing_pipe_command_that_had_sent_part_of_a_shard_is_run_again(shards, tmp_path):
    """``pipe:`` commands too (a cloud CLI streaming from object storage): the first run sends part
    of the shard and fails, the second sends it whole; the samples come once each, in order."""
    shard = os.path.join(os.path.dirname(shards), "train-000002.tar")
    marker = tmp_path / "ran-once"
    half = os.path.getsize(shard) // 2
    flaky = f"pipe:sh -c 'if [ -e {marker} ]; then cat {shard}; else touch {marker}; head -c {half} {shard}; exit 1; fi'"
    dataset = make_dataset(flaky, train=False)
    assert keys(dataset) == sorted(KEYS)[2 * PER_SHARD : 3 * PER_SHARD] and dataset.counter.total == 0
    assert marker.exists()


def test_retries_count_only_breaks_that_got_no_further(shards, tmp_path):
    """A command that breaks at 1/4, 2/4 and 3/4 of the shard on its first three runs: with one
    retry in a row allowed, each run gets further, so the shard is read whole; a run that gets no
    further spends the retry (here the fourth breaks where the third did, and the shard is given up)."""
    from mm_llama.data.shard_reader import ShardReader

    shard = os.path.join(os.path.dirname(shards), "train-000003.tar")
    size = os.path.getsize(shard)
    runs = tmp_path / "runs"

    def command(cuts: str) -> str:
        return (f"pipe:sh -c 'n=$(cat {runs} 2>/dev/null || echo 0); echo $((n+1)) > {runs}; "
                f"set -- {cuts}; shift $n 2>/dev/null || set --; "
                f"if [ $# -eq 0 ]; then cat {shard}; else head -c $(($1*{size}/4)) {shard}; exit 1; fi'")

    errors = []
    reader = ShardReader(lambda exn: errors.append(exn) or True, retries=1, pause_s=0.0)
    whole = [s["__key__"] for s in reader.read(command("1 2 3"))]
    assert whole == sorted(KEYS)[3 * PER_SHARD :] and not errors and runs.read_text().strip() == "4"

    runs.unlink()
    stalled = [s["__key__"] for s in reader.read(command("1 2 3 3 3"))]
    assert runs.read_text().strip() == "4" and len(errors) == 1  # the 4th run got no further: retry spent
    assert 0 < len(stalled) < PER_SHARD and stalled == sorted(KEYS)[3 * PER_SHARD :][: len(stalled)]


def tasks_of(samples) -> dict[str, set[str]]:
    by_task: dict[str, set[str]] = {}
    for sample in samples:
        by_task.setdefault(sample["meta"]["task"], set()).add(sample["meta"]["__key__"])
    return by_task


def test_task_weights_thin_the_named_task_in_training_only(shards):
    everything = tasks_of(make_dataset(shards, train=False))
    assert set(everything) == {"caption", "colour", "count", "where"} and len(everything["count"]) >= 6

    no_count = make_dataset(shards, train=True, task_weights={"count": 0.0})
    no_count.set_epoch(0)
    got = tasks_of(no_count)
    assert "count" not in got and got == {t: k for t, k in everything.items() if t != "count"}  # nothing else lost
    assert no_count.counter.total == 0  # a sampling choice, not a skip

    half = make_dataset(shards, train=True, task_weights={"count": 0.5, "caption": 1.0})
    mixes = []
    for epoch in (0, 1):
        half.set_epoch(epoch)
        got = tasks_of(half)
        assert got["caption"] == everything["caption"] and got["where"] == everything["where"]
        assert got["count"] < everything["count"]  # a strict subset: a 0.5 draw over >= 6 samples
        mixes.append(got["count"])
    assert mixes[0] != mixes[1]  # drawn again each epoch...
    again = make_dataset(shards, train=True, task_weights={"count": 0.5})
    assert keys(again, 1) == keys(half, 1)  # ...reproducibly

    evaluation = make_dataset(shards, train=False, task_weights={"count": 0.0})
    assert tasks_of(evaluation) == everything  # validation and test read every sample


@pytest.mark.parametrize("weights, message", [
    ({"count": 1.5}, r"task_weights\['count'\] is a keep probability in \[0, 1\], got 1.5"),
    ({"count": "half"}, "must map task names to numbers"),
    ([("count", 0.5)], "must be a mapping"),
])  # fmt: skip
def test_task_weights_are_validated(weights, message):
    with pytest.raises(ValueError, match=message):
        DataConfig("a.tar", task_weights=weights)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DataConfig("a.tar", batch_size=0)
    with pytest.raises(ValueError, match="epoch_length"):
        DataConfig("a.tar", resampled=True)
    with pytest.raises(ValueError, match="train_urls"):
        DataConfig("")


def test_collate_pads_right():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
         "image": torch.zeros(3, 8, 8), "meta": {"__key__": "a"}},
        {"input_ids": torch.tensor([9]), "labels": torch.tensor([9]),
         "image": torch.ones(3, 8, 8), "meta": {"__key__": "b"}},
    ]  # fmt: skip
    out = collate(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert out["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert out["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert out["images"].shape == (2, 3, 8, 8) and out["meta"] == [{"__key__": "a"}, {"__key__": "b"}]


def test_loader_with_persistent_workers(shards, corrupt_shard):
    """Real worker processes: batches, per-epoch coverage, shared epoch and shared skip counter."""
    url, good_keys, expected = corrupt_shard
    urls = f"{shards}::{url}"
    cfg = DataConfig(urls, image_size=32, batch_size=5, num_workers=2, shuffle_buffer=16, max_len=96)
    tok = chat_tokenizer()
    counter = SkipCounter(log_first=0)
    dataset = build_dataset(urls, tok, None, tok.vocab_size, train=True, cfg=cfg, counter=counter)
    loader = build_loader(dataset, cfg, pad_id=tok.pad_id)
    orders = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        orders.append([k["__key__"] for b in batches for k in b["meta"]])
        assert sorted(orders[-1]) == sorted(KEYS | good_keys)
    assert orders[0] != orders[1]
    assert {k: v // 2 for k, v in counter.counts().items() if v} == expected  # counted in workers, 2 epochs
    batch = batches[0]
    b, s = batch["input_ids"].shape
    assert batch["images"].shape == (b, 3, 32, 32) and batch["attention_mask"].dtype == torch.bool
    assert (batch["labels"][~batch["attention_mask"]] == IGNORE_INDEX).all()
    assert (batch["input_ids"][~batch["attention_mask"]] == tok.pad_id).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_batches_once_for_a_mid_epoch_resume(shards, workers):
    """``skip_next_pass(n)``: the next pass starts at batch n of the same epoch order; later passes are whole.
    With two workers the batches interleave (one shard pair each), and the skip still drops exactly n."""
    cfg = DataConfig(shards, image_size=32, batch_size=5, num_workers=workers, shuffle_buffer=16)
    tok = chat_tokenizer()
    dataset = build_dataset(shards, tok, None, tok.vocab_size, train=True, cfg=cfg)
    loader = build_loader(dataset, cfg, pad_id=tok.pad_id)

    def batch_keys() -> list[list[str]]:
        return [[m["__key__"] for m in b["meta"]] for b in loader]

    dataset.set_epoch(1)
    whole = batch_keys()
    loader.skip_next_pass(3)
    assert batch_keys() == whole[3:] and loader.pending_skip == 0
    assert batch_keys() == whole
    loader.skip_next_pass(len(whole) + 5)  # more than the pass holds: an empty pass, no error
    assert batch_keys() == [] and batch_keys() == whole


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_a_pass_leaves_torchs_global_random_stream_alone(shards, workers):
    """A new pass (an epoch, a resumed one, a scan) draws its workers' seed from the loader's own
    generator: the global stream that dropout and SpecAugment draw from is where it was, so a run
    resumed at an epoch boundary draws what the uninterrupted one drew. The batches are unchanged."""
    cfg = DataConfig(shards, image_size=32, batch_size=5, num_workers=workers, shuffle_buffer=16)
    tok = chat_tokenizer()
    dataset = build_dataset(shards, tok, None, tok.vocab_size, train=True, cfg=cfg)
    loader = build_loader(dataset, cfg, pad_id=tok.pad_id)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    keys = [[m["__key__"] for m in b["meta"]] for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)  # another global state: the same batches
    assert [[m["__key__"] for m in b["meta"]] for b in loader] == keys


def test_shard_reader_groups_members_by_key_and_reports_a_repeated_member(tmp_path):
    """The reader groups a tar's members into samples as webdataset does; a member whose name repeats
    within its sample goes to the handler (counted as the shard's read error) and is dropped, the
    rest of the shard still read. Local and ``file://`` shards are local (never retried), others remote."""
    import io
    import tarfile

    from mm_llama.data.shard_reader import ShardReader, is_remote

    path = tmp_path / "dup-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.json", b"1"), ("a.txt", b"x"), ("a.json", b"2"), ("b.JSON", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    errors = []
    samples = list(ShardReader(lambda exn: errors.append(exn) or True)([{"url": str(path)}]))
    assert [(s["__key__"], s.get("json"), s.get("txt")) for s in samples] == [("a", b"1", b"x"), ("b", b"3", None)]
    assert len(errors) == 1 and "duplicate file name" in str(errors[0]) and str(path) in errors[0].args
    counter = SkipCounter()
    assert [s["__key__"] for s in ShardReader(counter.handler)([{"url": f"file://{path}"}])] == ["a", "b"]
    assert counter.counts()["read_error"] == 1
    assert not is_remote(str(path)) and not is_remote(f"file://{path}")
    assert is_remote("pipe:cat x.tar") and is_remote("https://host/x.tar") and is_remote("s3://bucket/x.tar")
