"""reid_tf.version.commit: the commit a run used, `+dirty` when the code differs from it. The
records a queue writes into its own pinned clone as it goes (experiments/search/, the search's
export; experiments/results/, each finished run's JSON) are results, not code: changing them
must not mark every later run of the queue dirty (it did: every search trial read `+dirty`)."""

import subprocess

import pytest

from reid_tf import version


@pytest.fixture
def checkout(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    for path in ("reid_tf/train.py", "experiments/recipe.flags", "experiments/search/study.json",
                 "experiments/results/run_s0.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "start")
    return tmp_path


def test_a_clean_checkout_is_its_commit(checkout):
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert version.commit(str(checkout)) == head and len(head) == 40


@pytest.mark.parametrize("changed, dirty", [
    ("reid_tf/train.py", True), ("experiments/recipe.flags", True),
    ("experiments/search/study.json", False), ("experiments/results/run_s0.json", False)])
def test_only_code_and_recipes_make_a_checkout_dirty(checkout, changed, dirty):
    (checkout / changed).write_text("1\n")
    assert version.commit(str(checkout)).endswith("+dirty") == dirty
    (checkout / "experiments" / "results" / "run_s1.json").write_text("{}")  # new: untracked
    assert version.commit(str(checkout)).endswith("+dirty") == dirty
