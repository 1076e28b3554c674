"""The course: exercises.py cuts each exercise out of a copy of the repository; in that copy every
exercise's tests fail, on its own stub (its own message, so no test leans on another exercise). The
solutions are the repository: the same test functions pass in this suite, and `-k <exercise>` selects
exactly the tests exercises.EXERCISES lists, no more."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import exercises  # noqa: E402
from exercises import EXERCISES  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def graded(folder, tmp_path, tag):
    """Runs every exercise's tests in folder (selected with -k, as a student does) and returns
    {test id without parameters: [(outcome, message)] per parameter case}."""
    report = tmp_path / f"{tag}.xml"
    selection = " or ".join(EXERCISES)
    r = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-k", selection,
                        f"--junitxml={report}"], cwd=folder, env=ENV, capture_output=True, text=True, timeout=600)
    assert report.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    results = {}
    for case in ET.parse(report).iter("testcase"):
        test = f"tests/{case.get('classname').split('.')[-1]}.py::{case.get('name').split('[')[0]}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome = "skipped" if case.find("skipped") is not None else "failed" if bad is not None else "passed"
        results.setdefault(test, []).append((outcome, "" if bad is None else bad.get("message", "") + (bad.text or "")))
    return results


def test_every_exercise_fails_on_its_own_stub(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "exercises.py"), "make", str(tmp_path / "course")], check=True,
                   env=ENV, capture_output=True)
    course = graded(tmp_path / "course", tmp_path, "course")
    listed = {test for _, tests in EXERCISES.values() for test in tests}
    assert set(course) == listed  # -k selects the listed tests, all of them and nothing else
    for name, (_, tests) in EXERCISES.items():
        for test in tests:
            file, function = test.split("::")
            assert f"def {function}(" in (ROOT / file).read_text()  # the solution's test exists (and runs here)
            for outcome, message in course[test]:
                assert outcome == "failed" and f"exercise {name}:" in message, (name, test, message[-500:])


def test_make_only_cuts_the_exercises_asked_and_keeps_the_markers(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "exercises.py"), "make", str(tmp_path / "c"), "--only", "gae"],
                   check=True, env=ENV, capture_output=True)
    ppo = (tmp_path / "c" / "ppo.py").read_text()
    assert "raise NotImplementedError('exercise gae: " in ppo and "# exercise gae: " in ppo
    assert "exercise ppo_clip" in ppo and "raise NotImplementedError('exercise ppo_clip" not in ppo
    assert (tmp_path / "c" / "dpo.py").read_text() == (ROOT / "dpo.py").read_text()
    assert not (tmp_path / "c" / "out").exists() and not (tmp_path / "c" / ".git").exists()
    r = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "make", str(tmp_path / "c")], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr  # never writes over a course (a student's work)


def test_stub_replaces_the_region_by_one_raise_at_its_indent():
    text = "def f(x):\n    '''doc'''\n    # exercise gae: add one\n    y = x + 1\n    return y\n    # end exercise\n"
    found = [("gae", "add one", "    ", 3, 6)]
    assert exercises.stub(text, found, {"gae"}) == ("def f(x):\n    '''doc'''\n    # exercise gae: add one\n"
                                                   "    raise NotImplementedError('exercise gae: add one')\n"
                                                   "    # end exercise\n")
    assert exercises.stub(text, found, {"dpo_loss"}) == text


@pytest.mark.parametrize("body, line, expected", [
    pytest.param("# exercise gae: a\nx = 1\n", 1, "exercise 'gae' never ends", id="unclosed"),
    pytest.param("x = 1\n# end exercise\n", 2, "'# end exercise' without an exercise open", id="unopened"),
    pytest.param("# exercise gae: a\n# exercise dpo_loss: b\n# end exercise\n", 2, "a new exercise starts inside",
                 id="nested"),
    pytest.param("# exercise nonsense: a\n# end exercise\n", 1, "exercise 'nonsense' is not in exercises.EXERCISES",
                 id="unknown"),
])
def test_a_bad_marker_names_file_and_line(tmp_path, capsys, body, line, expected):
    path = tmp_path / "stage.py"
    path.write_text(body)
    with pytest.raises(SystemExit) as e:
        exercises.regions(path)
    assert e.value.code == 2 and f"{path}:{line}: {expected}" in capsys.readouterr().err
