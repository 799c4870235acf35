"""The fault suite: bad inputs and faults, each met with one clear line and nothing lost.

Every case runs the real command (subprocess) or server and asserts the exit code or status, one
line naming the path, flag or field, no traceback, and that existing files are intact
(checksums). Tiny data: one trained workdir and one export are shared by the module.
"""

import base64
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from reid_tf import testing
from reid_tf.data import splits as splits_lib
from reid_tf.data import synthetic
from reid_tf.deploy import runtime
from reid_tf.evaluate import features_npz
from reid_tf.evaluate import metrics as metrics_lib

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

TRAIN_FLAGS = ["--dataset=synthetic_persons/small", "--backbone=tiny", "--image_height=64",
               "--image_width=32", "--embedding_dim=16", "--num_parts=3",
               "--identities_per_batch=4", "--images_per_identity=4", "--optimizer=adam",
               "--learning_rate=0.001", "--log_every=4", "--checkpoint_every=4",
               "--image_summary_every=0"]


def run(module, *flags, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def assert_one_line_error(result, tool, *needles):
    """Exit 1, exactly one `<tool>: error:` line holding every needle, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{tool}: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return lines[0]


def checksums(folder):
    """{relative path: sha256} of every file under `folder`."""
    sums = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                sums[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return sums


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    splits_lib.load_splits("synthetic_persons/small", data_dir=path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A workdir with checkpoints at steps 4 and 8, and its export."""
    workdir = str(tmp_path_factory.mktemp("run"))
    result = run("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--train_steps=8", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"workdir": workdir, "data_dir": data_dir,
            "export": os.path.join(workdir, "export", "8")}


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A small Market-layout folder of rendered persons (JPEG)."""
    root = tmp_path_factory.mktemp("market")
    config = synthetic.SyntheticConfig(num_train_ids=6, num_test_ids=4, images_per_id=4,
                                       height=64, width=32, seed=3)
    for split, records in synthetic.generate(config).items():
        folder = root / {"train": "bounding_box_train", "query": "query",
                         "gallery": "bounding_box_test"}[split]
        folder.mkdir()
        for i, record in enumerate(records):
            Image.fromarray(record.image).save(
                folder / f"{record.person_id:04d}_c{record.camera_id}s1_{i:06d}_00.jpg")
    return root


def copy_of(market, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(market, root)
    return root


# ---------------------------------------------------------------- training and checkpoints

def test_truncated_newest_checkpoint_falls_back_and_is_kept_aside(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained["workdir"], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    data = [n for n in os.listdir(checkpoints) if n.startswith("ckpt-8.data")][0]
    with open(os.path.join(checkpoints, data), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    os.makedirs(os.path.join(checkpoints, "ckpt-12_temp", "part-00000-of-00001"))  # a dead save
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={trained['data_dir']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ckpt-8 is damaged" in result.stdout and "falling back to" in result.stdout
    assert "evaluating " + os.path.join(checkpoints, "ckpt-4") in result.stdout
    assert os.path.exists(os.path.join(checkpoints, "damaged", data))  # kept, not deleted
    assert not os.path.exists(os.path.join(checkpoints, "ckpt-12_temp"))
    # Training resumes from the intact checkpoint and goes on.
    result = run("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={trained['data_dir']}",
                 "--train_steps=12", "--export=false", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert "step 12/12" in result.stdout


def test_no_readable_checkpoint_is_one_line(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained["workdir"], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    for name in os.listdir(checkpoints):
        if ".data" in name:
            with open(os.path.join(checkpoints, name), "r+b") as f:
                f.truncate(10)
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={trained['data_dir']}")
    assert_one_line_error(result, "reid-eval", "no readable checkpoint", "ckpt-8", "ckpt-4")
    assert len([n for n in os.listdir(os.path.join(checkpoints, "damaged"))
                if ".data" in n]) == 2


def test_checkpoint_of_another_model_is_refused_not_half_restored(trained, tmp_path):
    """A checkpoint that lacks some of the model's variables (model.json edited, or a network
    whose layers were renumbered) must not leave them at their initial values unnoticed."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained["workdir"], workdir)
    path = os.path.join(workdir, "model.json")
    with open(path) as f:
        config = json.load(f)
    assert config["part_strategy"] == "bands"
    with open(path, "w") as f:
        json.dump({**config, "part_strategy": "learned"}, f)  # a learned part classifier more
    result = run("reid_tf.cli.eval", f"--workdir={workdir}", f"--data_dir={trained['data_dir']}")
    assert_one_line_error(result, "reid-eval", "ckpt-8", "does not hold every weight")


def test_refused_starts_write_nothing_and_the_corrected_command_then_runs(tmp_path, data_dir):
    workdir = tmp_path / "run"
    for flag, needle in [("--dataset=folder:/nonexistent/reid", "/nonexistent/reid"),
                         ("--num_parts=-1", "--num_parts=-1"),
                         ("--embedding_dim=0", "--embedding_dim=0"),
                         ("--validation_identities=-1", "--validation_identities")]:
        result = run("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={data_dir}",
                     "--train_steps=2", "--export=false", *TRAIN_FLAGS, flag)
        assert_one_line_error(result, "reid-train", needle)
        assert not workdir.exists() or not os.listdir(workdir), flag
    result = run("reid_tf.cli.train", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--train_steps=2", "--export=false", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]


def test_workdir_that_is_a_file_or_read_only(tmp_path, data_dir):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    result = run("reid_tf.cli.train", f"--workdir={path}", f"--data_dir={data_dir}",
                 "--train_steps=2", *TRAIN_FLAGS)
    assert_one_line_error(result, "reid-train", str(path), "is a file")
    assert path.read_text() == "keep me"
    # /proc refuses new files even to root (permission bits would not).
    result = run("reid_tf.cli.train", "--workdir=/proc/self/reid_run", f"--data_dir={data_dir}",
                 "--train_steps=2", *TRAIN_FLAGS)
    assert_one_line_error(result, "reid-train", "/proc/self", "not writable")


def tiff_named_jpg(path):
    Image.fromarray(np.full((64, 32, 3), 120, np.uint8)).save(path, format="TIFF")


def test_image_that_only_pillow_reads_is_caught_at_start(market, tmp_path, data_dir):
    root = copy_of(market, tmp_path)
    bad = root / "bounding_box_train" / "0000_c1s1_999999_00.jpg"
    tiff_named_jpg(bad)
    before = checksums(root)
    workdir = tmp_path / "run"
    flags = [f"--dataset=folder:{root}", "--backbone=tiny", "--image_height=64",
             "--image_width=32", "--embedding_dim=16", "--num_parts=2",
             "--identities_per_batch=2", "--images_per_identity=2", "--train_steps=4",
             "--export=false", "--image_summary_every=0"]
    result = run("reid_tf.cli.train", f"--workdir={workdir}", *flags)
    assert_one_line_error(result, "reid-train", "1 corrupt or unreadable image", "--skip_corrupt")
    assert str(bad) in result.stderr
    assert not workdir.exists() or not os.listdir(workdir)
    result = run("reid_tf.cli.train", f"--workdir={workdir}", *flags, "--skip_corrupt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 corrupt image" in result.stdout and "step 4/4" in result.stdout
    assert checksums(root) == before


def test_non_utf8_file_name_is_named(market, tmp_path):
    root = copy_of(market, tmp_path)
    folder = os.fsencode(root / "bounding_box_train")
    bad = os.path.join(folder, b"0001_c1s1_00\xff\xfe_00.jpg")
    shutil.copy(os.path.join(folder, sorted(os.listdir(folder))[0]), bad)
    result = run("reid_tf.cli.train", f"--workdir={tmp_path / 'run'}", f"--dataset=folder:{root}",
                 "--backbone=tiny", "--train_steps=1")
    line = assert_one_line_error(result, "reid-train", "not valid UTF-8", "bounding_box_train")
    assert "0001_c1s1_00" in line


# ---------------------------------------------------------------- tools

def test_reid_eval_on_an_empty_export_folder(tmp_path):
    result = run("reid_tf.cli.eval", f"--export={tmp_path}", "--dataset=synthetic_persons/small")
    assert_one_line_error(result, "reid-eval", str(tmp_path), "saved_model.pb")


def test_reid_eval_export_uses_the_training_size(trained):
    """The export records 64x32; reid-eval must not resize to its own 256x128 first."""
    logged = json.load(open(os.path.join(trained["workdir"], "results.json")))
    output = os.path.join(trained["workdir"], "eval_export")
    result = run("reid_tf.cli.eval", f"--export={trained['export']}",
                 "--dataset=synthetic_persons/small", f"--data_dir={trained['data_dir']}",
                 f"--output_dir={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.load(open(os.path.join(output, "results.json")))
    assert evaluated["mAP"] == pytest.approx(logged["mAP"], abs=1e-4)
    assert runtime.SavedModelRuntime(trained["export"]).image_size == (64, 32)
    result = run("reid_tf.cli.eval", f"--export={trained['export']}",
                 "--dataset=synthetic_persons/small", f"--data_dir={trained['data_dir']}",
                 "--image_height=256", "--image_width=128")
    assert_one_line_error(result, "reid-eval", "trained at (64, 32)")


def test_reid_extract_refuses_a_folder_as_output_before_any_work(trained, tmp_path, market):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    result = run("reid_tf.cli.extract", f"--export={trained['export']}", f"--images={market}",
                 f"--output={folder}")
    assert_one_line_error(result, "reid-extract", str(folder), "is a folder")
    assert "extracting" not in result.stderr  # refused before the extraction started
    assert os.listdir(folder) == ["keep.txt"] and not list(tmp_path.glob("*.tmp"))


def test_reid_extract_corrupt_file_offers_a_flag_it_has(trained, tmp_path, market):
    root = copy_of(market, tmp_path)
    bad = root / "bounding_box_test" / "0007_c1s1_999999_00.jpg"
    bad.write_bytes(b"not an image")
    output = tmp_path / "features.npz"
    output.write_bytes(b"an earlier features.npz")
    result = run("reid_tf.cli.extract", f"--export={trained['export']}", f"--images={root}",
                 f"--output={output}")
    assert_one_line_error(result, "reid-extract", "--skip_corrupt")
    assert str(bad) in result.stderr
    assert output.read_bytes() == b"an earlier features.npz"
    result = run("reid_tf.cli.extract", f"--export={trained['export']}", f"--images={root}",
                 f"--output={output}", "--skip_corrupt")
    assert result.returncode == 0, result.stderr[-3000:]
    arrays = features_npz.load_features(str(output))
    assert bad.name not in set(arrays["file_names"])
    assert len(arrays["file_names"]) == len(os.listdir(root / "bounding_box_test")) - 1


def test_reid_extract_skip_corrupt_works_on_a_plain_folder_too(trained, tmp_path, market):
    """Issue 39: on a folder that is not a Market layout, --skip_corrupt had no effect (the
    extraction failed on the bad file either way)."""
    folder = tmp_path / "cams"
    shutil.copytree(market / "bounding_box_test", folder / "cam1")
    bad = folder / "cam1" / "broken.jpg"
    bad.write_bytes(b"not an image")
    output = tmp_path / "features.npz"
    result = run("reid_tf.cli.extract", f"--export={trained['export']}", f"--images={folder}",
                 f"--output={output}")
    assert_one_line_error(result, "reid-extract", "broken.jpg", "--skip_corrupt")
    assert not output.exists()
    result = run("reid_tf.cli.extract", f"--export={trained['export']}", f"--images={folder}",
                 f"--output={output}", "--skip_corrupt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 corrupt image(s)" in result.stdout + result.stderr
    names = set(features_npz.load_features(str(output))["file_names"])
    assert len(names) == len(os.listdir(market / "bounding_box_test"))
    assert os.path.join("cam1", "broken.jpg") not in names


# ---------------------------------------------------------------- evaluation and summaries

def test_evaluate_takes_lists_and_refuses_no_valid_query():
    distances = [[0.1, 0.9], [0.8, 0.2]]
    result = metrics_lib.evaluate(distances, [1, 2], [1, 2], [0, 0], [1, 1])
    assert result["rank1"] == 1.0 and result["mAP"] == 1.0
    same_camera = (np.array([[0.1, 0.2]]), [1], [1, 3], [0], [0, 0])
    for evaluate in (metrics_lib.evaluate, metrics_lib.evaluate_single_gallery_shot):
        with pytest.raises(ValueError, match="no query has a true match"):
            evaluate(*same_camera)
    with pytest.raises(ValueError, match="no query has a true match"):
        metrics_lib.evaluate_features(np.eye(2, dtype=np.float32)[:1],
                                     np.eye(2, dtype=np.float32), [1], [1, 3], [0], [0, 0])


def load_summarize():
    return testing.load_script(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                            "summarize.py"))


def record(name, seed, num_parts, map_, data="labeled", embedding_dim=256):
    return name, {"name": name, "recipe": f"cuhk03_pair1_{data}_mobilenetv2_128x64",
                  "config": {"seed": seed, "num_parts": num_parts, "part_strategy": "bands",
                             "embedding_dim": embedding_dim},
                  "results": {"rank1": map_, "mAP": map_, "descriptors": {
                      name: {"rank1": map_, "mAP": map_}
                      for name in ("embedding", "global_embedding", "part_embeddings")}}}


def test_summarize_pairs_runs_by_seed_and_checks_num_parts():
    summarize = load_summarize()
    records = dict([record("cuhk03_pair1_labeled_baseline_s0", 0, 0, 0.30),
                    record("cuhk03_pair1_labeled_baseline_s2", 2, 0, 0.50),  # seed 1 failed
                    record("cuhk03_pair1_labeled_plnet_s0", 0, 4, 0.31),
                    record("cuhk03_pair1_labeled_plnet_s1", 1, 4, 0.90),
                    record("cuhk03_pair1_labeled_plnet_s2", 2, 4, 0.52)])
    table = summarize.main_table(records)
    row = [line for line in table.splitlines() if "(b)" in line][0]
    assert "s0: +1.0 / +1.0; s2: +2.0 / +2.0" in row  # by seed: s1 has no baseline to pair
    records["cuhk03_pair1_labeled_plnet_s2"]["config"]["num_parts"] = 0
    with pytest.raises(ValueError, match="num_parts=0, but its row needs 4"):
        summarize.main_table(records)


def test_summarize_validation_seeds_mean_and_paired_gain():
    summarize = load_summarize()

    def val(name, seed, map_):
        return name, {"name": name, "config": {"seed": seed}, "results": {"validation": {
            "rank1": map_, "mAP": map_, "descriptors": {"global_embedding": {"mAP": map_ / 2}}}}}
    prefix = "cuhk03_pair1_labeled_val_"
    records = dict([val(prefix + "stripes_e12", 0, 0.58), val(prefix + "stripes_e12_s1", 1, 0.56),
                    val(prefix + "learned_e12", 0, 0.59), val(prefix + "learned_e12_s1", 1, 0.60),
                    val(prefix + "learned_e12_s2", 2, 0.61),  # no stripes at seed 2: unpaired
                    val(prefix + "bands_e12", 0, 0.57)])  # one seed: not in the table
    table = summarize.validation_seeds_table(records)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert sorted(rows) == ["learned_e12", "stripes_e12"]
    assert rows["learned_e12"] == ("| learned_e12 | [0, 1, 2] | 60.0 ± 1.0 | 60.0 ± 1.0 | "
                                   "30.0 ± 0.5 | 2.5 ± 2.1 (seeds [0, 1]) |")
    assert rows["stripes_e12"].endswith("| 57.0 ± 1.4 | 28.5 ± 0.7 | – |")


def test_summarize_paired_gains_verdict_and_peer_agreement():
    summarize = load_summarize()
    records = dict([record(f"cuhk03_pair1_labeled_baseline_s{s}", s, 0, m)
                    for s, m in ((0, 0.30), (1, 0.32), (2, 0.31))]
                   + [record(f"cuhk03_pair1_labeled_plnet_s{s}", s, 4, m)
                      for s, m in ((0, 0.34), (1, 0.37), (2, 0.35))])  # gains 4, 5, 4 points
    lines = summarize.comparison_lines(records).splitlines()
    plnet = [line for line in lines if "(b)" in line][0]
    assert "rank-1 +4.3 ± 0.6" in plnet and "target" in plnet and ": met" in plnet
    records["cuhk03_pair1_labeled_plnet_s1"]["results"]["mAP"] = 0.31
    lines = summarize.comparison_lines(records).splitlines()
    plnet = [line for line in lines if "(b)" in line][0]
    assert "mAP +2.3 ± 2.9" in plnet and "missed on mAP" in plnet  # gains 4, -1, 4
    for seed, gap in ((0, 0.01), (1, -0.03)):  # the peer 1 above, then 3 below: mean -1
        name, peer = record(f"peer_labeled_baseline_s{seed}", seed, 0, 0.0)
        peer["results"] = {"rank1": 0.30 + 0.02 * seed + gap, "mAP": 0.30 + 0.02 * seed + gap}
        records[name] = peer
    peer_line = [line for line in summarize.comparison_lines(records).splitlines()
                 if "peer" in line][0]
    assert "mean against mean: rank-1 -1.0, mAP -1.0; within 2 points" in peer_line
    assert "seeds span rank-1 30.0-32.0" in peer_line
    # Seed numbers do not pair across frameworks: one peer seed is held against all of ours.
    del records["peer_labeled_baseline_s1"]
    peer_line = [line for line in summarize.comparison_lines(records).splitlines()
                 if "peer" in line][0]
    assert "peer (seeds [0]) − reid-tf (a) (seeds [0, 1, 2])" in peer_line
    assert "rank-1 +0.0, mAP +0.0" in peer_line  # 31 against the mean of 30, 32, 31
    peer_row = [line for line in summarize.main_table(records).splitlines() if "PyTorch" in line]
    assert peer_row[0].endswith("| not paired: see the mean against mean below | – |")
    # No speeds from the runs' logs: they depend on whatever else shared the machine.
    assert "img" not in peer_line and "train_vs_torch.py" in peer_line


def test_summarize_feature_levels_averages_over_seeds(tmp_path):
    summarize = load_summarize()
    os.makedirs(tmp_path / "feature_levels")
    for seed, value in ((0, 0.20), (1, 0.30)):
        name = f"cuhk03_pair1_labeled_plnet_s{seed}"
        levels = {level: {"rank1": value, "mAP": value / 2, "dim": 256}
                  for level in summarize.LEVELS}
        with open(tmp_path / "feature_levels" / f"{name}.json", "w") as f:
            json.dump({"name": name, "seed": seed, "levels": levels}, f)
    row = summarize.feature_levels_table(str(tmp_path)).splitlines()[2]
    assert row.startswith("| labeled | PL-Net (global branch) | 0, 1 | 25.0 / 12.5 (256-d) |")


def test_skip_corrupt_preparation_has_its_own_cache(tmp_path):
    import tensorflow_datasets as tfds
    import reid_datasets

    reid_datasets.register("synthetic_persons/small")
    plain = tfds.builder("synthetic_persons/small", data_dir=str(tmp_path))
    skipping = tfds.builder("synthetic_persons/small", data_dir=str(tmp_path), skip_corrupt=True)
    assert plain.data_dir != skipping.data_dir
    assert os.path.join(str(tmp_path), "skip_corrupt") in skipping.data_dir


# ---------------------------------------------------------------- serving

@functools.lru_cache(maxsize=None)
def png_bomb(side=20000):
    """A PNG of side x side black pixels: ~1 MB compressed, 1.2 GB decoded."""
    import struct
    import zlib

    row = b"\x00" + b"\x00" * (side * 3)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def small_png(seed=0):
    image = np.random.default_rng(seed).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    with testing.serve(trained["export"], "--timeout_s=3", "--max_connections=4",
                       log=log) as client:
        yield client
    log.close()


def peak_rss_gib(pid):
    """Peak resident memory (VmHWM) of process `pid`, GiB."""
    with open(f"/proc/{pid}/status") as f:
        line = [line for line in f if line.startswith("VmHWM")][0]
    return int(line.split()[1]) / (1 << 20)


def assert_still_serves(server, trained, data):
    """A valid request after the fault gets the export's own embedding of its image."""
    status, answer = server.request("POST", "/v1/models/reid:predict",
                                    {"instances": [{"b64": base64.b64encode(data).decode()}]})
    assert status == 200
    expected = runtime.SavedModelRuntime(trained["export"]).predict_encoded([data])["embedding"][0]
    np.testing.assert_allclose(answer["predictions"][0]["embedding"], expected, atol=1e-5)


def test_decompression_bomb_is_refused_from_its_header(server, trained):
    bomb = base64.b64encode(png_bomb()).decode()
    status, answer = server.request("POST", "/v1/models/reid:predict",
                                    {"instances": [{"b64": bomb}]})
    assert status == 400 and answer["field"] == "instances[0].b64", answer
    assert "20000x20000" in answer["error"] and "--max_image_pixels" in answer["error"]
    assert peak_rss_gib(server.pid) < 1.5
    assert_still_serves(server, trained, small_png(1))


@pytest.mark.parametrize("nesting", ["[" * 10000 + "]" * 10000,
                                     '{"a":' * 10000 + "1" + "}" * 10000,
                                     '{"instances": ' + "[" * 10000 + "]" * 10000 + "}"])
def test_deeply_nested_json_is_a_400(server, nesting):
    status, answer = server.request("POST", "/v1/models/reid:predict", nesting.encode())
    assert status == 400, answer
    status, _ = server.request("GET", "/v1/models/reid")
    assert status == 200


def raw_connection(port):
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    return connection


def test_stalled_body_gets_408_within_the_timeout(server):
    connection = raw_connection(server.port)
    start = time.monotonic()
    connection.sendall(b"POST /v1/models/reid:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"in")
    for _ in range(2):  # trickle, then stall
        time.sleep(0.5)
        connection.sendall(b"s")
    answer = connection.recv(65536)
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < 3 + 2, elapsed
    assert connection.recv(65536) == b""  # closed
    connection.close()


def test_stalled_headers_are_closed_within_the_timeout(server):
    connection = raw_connection(server.port)
    start = time.monotonic()
    connection.sendall(b"POST /v1/models/reid:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    connection.settimeout(30)
    assert connection.recv(65536) == b""  # closed by the server, no answer
    assert time.monotonic() - start < 3 + 2
    connection.close()


def test_connections_over_the_cap_get_503(server, trained):
    if server.connection is not None:  # the client's own kept-alive connection
        server.connection.close()
        server.connection = None
    idle = [raw_connection(server.port) for _ in range(4)]
    time.sleep(0.3)
    extra = raw_connection(server.port)
    answer = extra.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    for connection in idle + [extra]:
        connection.close()
    time.sleep(0.3)
    assert_still_serves(server, trained, small_png(2))


def test_summarize_strong_baseline_rows_commits_grid_and_robustness():
    summarize = load_summarize()

    def run(name, seed, num_parts, map_, commit="a" * 40, triplet=0.0, strategy="bands",
            detected=None, **config):
        name, rec = record(name, seed, num_parts, map_)
        rec["config"].update(triplet_weight=triplet, part_strategy=strategy, **config)
        rec["results"]["code"] = {"version": "0.1.0", "commit": commit}
        if detected is not None:
            rec["results"]["also_evaluated"] = {summarize.DETECTED: {"rank1": detected,
                                                                     "mAP": detected}}
        return name, rec

    R = "cuhk03_pair1_labeled"
    records = dict(
        [run(f"{R}_baseline_triplet_s{s}", s, 0, 0.40 + 0.01 * s, triplet=1.0) for s in range(3)]
        + [run(f"{R}_plnet_triplet_s{s}", s, 6, m, triplet=1.0, detected=m - 0.1)
           for s, m in enumerate((0.43, 0.44, 0.46))]  # gains over (f) 3, 3, 4
        + [run(f"{R}_stripes_s{s}", s, 4, 0.30, strategy="stripes") for s in range(3)])
    table = summarize.main_table(records)
    assert "| (g) PL-Net + triplet | 44.3 ± 1.5 |" in table and "| aaaaaaaaaa |" in table
    lines = summarize.comparison_lines(records).splitlines()
    g_f = [line for line in lines if "(g) PL-Net + triplet − (f)" in line][0]
    assert "rank-1 +3.3 ± 0.6" in g_f and "target (≥ +2 rank-1 and mAP" in g_f and ": met" in g_f
    # A row whose runs ran different commits is refused, naming them.
    records[f"{R}_stripes_s1"]["results"]["code"]["commit"] = "b" * 40
    with pytest.raises(ValueError, match=r"row \(h\).*different commits.*stripes_s1 b{40}"):
        summarize.main_table(records)
    records[f"{R}_stripes_s1"]["results"]["code"]["commit"] = "a" * 40
    # A row claiming a triplet loss refuses a run without one.
    records[f"{R}_baseline_triplet_s2"]["config"]["triplet_weight"] = 0.0
    with pytest.raises(ValueError, match="triplet_weight=0.0, but its row needs a triplet"):
        summarize.main_table(records)
    records[f"{R}_baseline_triplet_s2"]["config"]["triplet_weight"] = 1.0
    # Robustness: labeled-trained (g) on detected test boxes, 10 points lower on each seed.
    robustness = summarize.robustness_table(records)
    row = [line for line in robustness.splitlines() if line.startswith("| (g)")][0]
    assert "| 0, 1, 2 | 44.3 ± 1.5 / 44.3 ± 1.5 | 34.3 ± 1.5 / 34.3 ± 1.5 | -10.0 ± 0.0 |" in row
    # The K x lambda grid: each cell from its run (K=4, lambda=1 from bands_e12), the best named.
    grid = {}
    for K, lam, m in ((2, "0.5", 0.50), (4, "1", 0.56), (6, "2", 0.58)):
        name, rec = run(summarize.grid_name(K, lam), 0, K, 0.0, part_loss_weight=float(lam))
        rec["results"]["validation"] = {"mAP": m, "rank1": m + 0.01}
        grid[name] = rec
    text = summarize.grid_table(grid)
    assert "| 4 | – | 56.0 / 57.0 | – |" in text and "Best validation mAP: K=6, λ=2 (58.0" in text
    grid[summarize.grid_name(6, "2")]["config"]["part_loss_weight"] = 1.0
    with pytest.raises(ValueError, match="part_loss_weight=1.0, but its cell needs 2"):
        summarize.grid_table(grid)
