"""`gateway policy check`: policy files against the schema and the model repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from tests.conftest import MODEL, MODELS, POLICIES, ROOT

BUNDLED = POLICIES / f"{MODEL}.yaml"
BUNDLED_TEXT = BUNDLED.read_text(encoding="utf-8")
AGE_LINE = "    age:                  {type: int, min: 18, max: 120, description: Applicant age in years}\n"


def variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """A copy of the bundled policy with one piece of text replaced."""
    assert old in BUNDLED_TEXT, f"the bundled policy no longer contains {old!r}"
    path = tmp_path / name
    path.write_text(BUNDLED_TEXT.replace(old, new, 1), encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    """1-based number of the first line of `path` that contains `text`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def check(capsys: pytest.CaptureFixture[str], *files: Path | str, models: Path = MODELS) -> tuple[int, str, str]:
    code = main(["policy", "check", "--models", str(models), *map(str, files)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_bundled_policy_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, BUNDLED)
    assert code == EXIT_OK == 0
    assert out == f"{BUNDLED}: ok\n"
    assert err == ""


def test_a_schema_error_is_positioned(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "{type: int, min: 18,", "{type: int, minimum: 18,")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID == 1
    line = line_of(path, "minimum: 18")
    assert re.search(rf"^{re.escape(str(path))}:{line}:\d+: schema\.features\.age\.minimum: unknown key", out, re.M)
    assert out.endswith(f"{path}: 1 error\n")


def test_a_feature_missing_from_the_signature(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "    purpose:\n", "    zodiac: {type: string}\n    purpose:\n")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    line = line_of(path, "zodiac")
    assert f"{path}:{line}:" in out
    assert "schema.features.zodiac: feature 'zodiac'" in out
    assert "(versions 1, 2)" in out


def test_a_feature_input_missing_from_the_signature(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "max: 120,", "max: 120, input: age_years,")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    assert "schema.features.age: feature 'age' has no model input 'age_years'" in out


def test_a_category_feature_on_a_float_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", AGE_LINE, "    age: {type: category, values: [young, old]}\n")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    line = line_of(path, "young")
    assert f"{path}:{line}:" in out
    assert "schema.features.age.type: a category feature cannot feed FP32 input 'age'" in out
    assert out.endswith(f"{path}: 1 error\n")


def test_an_optional_feature_that_can_never_be_absent(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "{type: int, min: 18,", "{type: int, required: false, min: 18,")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    assert "schema.features.age.required: a feature that is not required must be nullable or have a default" in out


def test_a_model_not_in_the_repository(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", f"model: {MODEL}\n", "model: no-such-model\n")
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    line = line_of(path, "no-such-model")
    assert f"{path}:{line}:8: model: model 'no-such-model' is not in the model repository" in out


def test_routing_stable_names_a_missing_version(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", 'stable: "1"', 'stable: "7"')
    code, out, _ = check(capsys, path)
    assert code == EXIT_INVALID
    assert f"{path}:{line_of(path, 'stable')}:" in out
    assert "routing.stable: version '7' is not in the repository; versions: ['1', '2']" in out


def test_a_model_input_without_a_feature_is_only_a_warning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "    has_cosigner:         {type: bool, required: false, default: false}\n", "")
    path.write_text(path.read_text().replace(' and not has_cosigner', ''))  # the fallback rule uses it
    code, out, _ = check(capsys, path)
    assert code == EXIT_OK
    assert "model input 'has_cosigner' has no feature in the policy" in out
    assert "[warning]" in out
    assert out.endswith(f"{path}: ok (1 warnings)\n")


def test_several_files_report_every_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    schema_error = variant(tmp_path, "a.yaml", "{type: int, min: 18,", "{type: int, min: abc,")
    misfits = variant(tmp_path, "b.yaml", AGE_LINE, "    age: {type: category, values: [young, old]}\n")
    misfits.write_text(misfits.read_text().replace('stable: "1"', 'stable: "9"'))
    code, out, _ = check(capsys, schema_error, BUNDLED, misfits)
    assert code == EXIT_INVALID
    assert f"{schema_error}:{line_of(schema_error, 'abc')}:" in out and "schema.features.age.min" in out
    assert f"{schema_error}: 1 error\n" in out
    assert f"{BUNDLED}: ok\n" in out
    assert "routing.stable: version '9'" in out and "schema.features.age.type" in out
    assert f"{misfits}: 2 errors\n" in out
    # files are reported in the order given
    assert out.index(str(schema_error)) < out.index(str(BUNDLED)) < out.index(str(misfits))


def test_a_missing_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = check(capsys, BUNDLED, tmp_path / "nope.yaml")
    assert code == EXIT_USAGE == 2
    assert f"no such file: {tmp_path / 'nope.yaml'}" in err
    assert out == ""  # nothing is checked


def test_a_missing_model_repository_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = check(capsys, BUNDLED, models=tmp_path / "no-models")
    assert code == EXIT_USAGE
    assert "is not a directory" in err


@pytest.mark.parametrize("argv", [[], ["policy"], ["policy", "check"]])
def test_missing_arguments_print_usage(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: gateway")
    assert "the following arguments are required" in err


def test_python_dash_m_gateway(tmp_path: Path) -> None:
    broken = variant(tmp_path, "broken.yaml", 'stable: "1"', 'stable: "7"')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", "--models", str(MODELS), str(BUNDLED), str(broken)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert done.returncode == EXIT_INVALID, done.stderr
    assert f"{BUNDLED}: ok\n" in done.stdout
    assert f"{broken}:{line_of(broken, 'stable')}:" in done.stdout
    assert f"{broken}: 1 error\n" in done.stdout


def test_the_missing_input_message_reads_well(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = variant(tmp_path, "p.yaml", "    purpose:\n", "    zodiac: {type: string}\n    purpose:\n")
    _, out, _ = check(capsys, path)
    assert "feature 'zodiac' has no model input of that name" in out
