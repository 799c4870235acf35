"""reid-extract --runner: extraction as an Apache Beam pipeline (DirectRunner, 2 worker
processes) against the single-process reid-extract on the same folder."""

import glob
import os

import numpy as np
import pytest

from reid_tf import extras
from reid_tf import testing
from reid_tf.deploy import beam
from reid_tf.evaluate import features_npz

pytestmark = pytest.mark.slow  # every test here trains, serves or runs a tool

TWO_WORKERS = ["--", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    """40 test-gallery images in a folder (a few in a sub-folder), Market names."""
    root = tmp_path_factory.mktemp("cams")
    gallery = trained["splits"]["gallery"]
    os.makedirs(root / "cam2")
    for i in range(40):
        name = gallery.file_names[i]
        path = root / ("cam2" if i % 5 == 0 else "") / name
        path.write_bytes(bytes(gallery.images[i]))
    return root


def extract_with_beam(trained, images, output, *flags):
    return testing.run_module("reid_tf.cli.extract", "--runner=DirectRunner",
                              f"--export={trained['export']}", f"--images={images}",
                              f"--output={output}", "--batch_size=8", *flags)


def test_beam_extraction_equals_reid_extract_sends_bad_files_aside_and_is_exactly_once(
        trained, folder, tmp_path):
    single = tmp_path / "single.npz"
    testing.run_module("reid_tf.cli.extract", f"--export={trained['export']}",
                       f"--images={folder}", f"--output={single}")
    expected = features_npz.load_features(str(single))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (folder / "notes.txt").write_text("not an image: not matched at all")

    output = tmp_path / "beam"
    result = extract_with_beam(trained, folder, output, "--num_shards=3", *TWO_WORKERS)
    assert f"wrote {output}: 40 rows, 1 dead letter(s)" in result.stdout
    assert len(glob.glob(str(output / "part-*-of-00003.parquet"))) == 3
    rows, letters = beam.read_output(str(output))
    order = np.argsort(expected["file_names"])
    np.testing.assert_array_equal(rows["file_names"], expected["file_names"][order])
    assert sum(name.startswith("cam2/") for name in rows["file_names"]) == 8  # relative names
    np.testing.assert_array_equal(rows["ids"], rows["file_names"])
    np.testing.assert_array_equal(rows["person_ids"], expected["person_ids"][order])
    np.testing.assert_array_equal(rows["camera_ids"], expected["camera_ids"][order])
    np.testing.assert_allclose(rows["embeddings"], expected["embeddings"][order], atol=1e-5)
    assert letters == [{"path": str(folder / "broken.jpg"),
                        "reason": "not a decodable JPEG/PNG/BMP image"}]

    # Again over the same input, with another shard count: the same rows, none twice, and the
    # earlier run's shards gone.
    result = extract_with_beam(trained, folder, output, "--num_shards=2", *TWO_WORKERS)
    assert f"wrote {output}: 40 rows, 1 dead letter(s)" in result.stdout
    assert sorted(os.path.basename(p) for p in glob.glob(str(output / "part-*"))) == [
        "part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    again, letters = beam.read_output(str(output))
    assert len(set(again["ids"])) == len(again["ids"]) == 40
    np.testing.assert_allclose(again["embeddings"], rows["embeddings"], atol=1e-6)
    assert len(letters) == 1
    (folder / "broken.jpg").unlink()
    (folder / "notes.txt").unlink()


def test_a_glob_reads_only_what_it_matches(trained, folder, tmp_path):
    output = tmp_path / "beam"
    extract_with_beam(trained, f"{folder}/cam2/*.jpg", output)
    rows, letters = beam.read_output(str(output))
    assert len(rows["ids"]) == 8 and not letters
    assert all("/" not in name for name in rows["file_names"])  # relative to cam2/


def test_bad_inputs_and_a_foreign_output_are_refused_before_the_pipeline(trained, folder,
                                                                         tmp_path):
    """Issue 39: a bad export was opened only inside the workers, a glob matching nothing exited
    0 with 0 rows, and an output folder's unrelated part-*.parquet files were deleted."""
    def refused(*flags):
        result = testing.run_module("reid_tf.cli.extract", "--runner=DirectRunner", *flags,
                                    check=False)
        assert result.returncode == 1, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("reid-extract: error: ") and "Traceback" not in result.stderr
        return last

    output = tmp_path / "out"
    not_an_export = tmp_path / "export"
    not_an_export.mkdir()
    assert "no saved_model.pb" in refused(f"--export={not_an_export}", f"--images={folder}",
                                          f"--output={output}")
    assert not output.exists()  # refused before anything was made
    assert "matches no image file" in refused(
        f"--export={trained['export']}", f"--images={folder}/nowhere/*.jpg",
        f"--output={output}")
    output.mkdir()
    theirs = output / "part-00000-of-00001.parquet"
    theirs.write_bytes(b"someone else's table")
    message = refused(f"--export={trained['export']}", f"--images={folder}",
                      f"--output={output}")
    assert "did not write there (part-00000-of-00001.parquet" in message
    assert theirs.read_bytes() == b"someone else's table"


def test_a_failed_run_leaves_no_temporary_folder(trained, folder, tmp_path, monkeypatch):
    """Issue 39: a run that failed mid-pipeline left Beam's beam-temp-* folders behind."""
    handler_class = beam._model_handler_class

    def failing():
        class Failing(handler_class()):
            def run_inference(self, batch, model, inference_args=None):
                raise RuntimeError("the model broke mid-run")
        return Failing

    monkeypatch.setattr(beam, "_model_handler_class", failing)
    output = tmp_path / "out"
    with pytest.raises(Exception, match="the model broke mid-run"):
        beam.run(trained["export"], str(folder), str(output),
                 pipeline_args=["--runner=DirectRunner"], log=lambda line: None)
    assert output.exists() and not list(output.glob("beam-temp-*"))


def test_without_apache_beam_one_line_names_the_extra(monkeypatch, tmp_path):
    testing.hide_package(monkeypatch, "apache_beam")
    with pytest.raises(extras.MissingPackage, match=r"apache_beam is not installed; install it "
                                                    r"with pip install 'reid-tf\[beam\]'"):
        beam.run("export", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="neither a folder nor a glob"):
        beam.input_pattern(str(tmp_path / "missing"))
