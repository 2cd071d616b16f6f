"""The --NAME=value constant-override helper."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from models.config import (ConfigError, constants_of, help_text, load_config, parse_overrides, save_config,
                           settings_block)

DEFAULTS = {"EPOCHS": 10, "LR": 1e-3, "RESUME": False, "DATA_DIR": "data", "BULK": None, "DIMS": [128, 64]}


def test_values_take_the_constant_type():
    values = parse_overrides(DEFAULTS, ["--EPOCHS=3", "--LR=5e-4", "--RESUME=true", "--DATA_DIR=/tmp/x",
                                        "--DIMS=[32, 16]"])
    assert values == {"EPOCHS": 3, "LR": 5e-4, "RESUME": True, "DATA_DIR": "/tmp/x", "BULK": None, "DIMS": [32, 16]}
    assert isinstance(values["LR"], float)
    assert parse_overrides(DEFAULTS, ["--LR=1"])["LR"] == 1.0
    assert parse_overrides(DEFAULTS, ["--RESUME=0"])["RESUME"] is False


def test_optional_setting_accepts_strings_and_numbers():
    assert parse_overrides(DEFAULTS, ["--BULK=my/bulk.tsv"])["BULK"] == "my/bulk.tsv"
    assert parse_overrides(DEFAULTS, ["--BULK=12"])["BULK"] == 12


def test_defaults_untouched_without_arguments():
    assert parse_overrides(DEFAULTS, []) == DEFAULTS


@pytest.mark.parametrize("arg, message", [
    ("--EPOHCS=3", "unknown setting 'EPOHCS'; valid names are: BULK, DATA_DIR, DIMS, EPOCHS, LR, RESUME"),
    ("--EPOCHS=3.5", "--EPOCHS expects an integer"),
    ("--LR=fast", "--LR expects a number"),
    ("--RESUME=maybe", "--RESUME expects a boolean"),
    ("--DIMS=7", "--DIMS expects a list"),
    ("EPOCHS=3", "use --NAME=value"),
    ("--EPOCHS", "use --NAME=value"),
])
def test_bad_arguments_are_errors(arg, message):
    with pytest.raises(ConfigError) as err:
        parse_overrides(DEFAULTS, [arg])
    assert message in str(err.value)


def test_load_config_reads_module_constants_and_exits_on_typos():
    namespace = {"EPOCHS": 5, "lowercase": 1, "helper": len, "json": json, "DATA_DIR": "data"}
    assert constants_of(namespace) == {"EPOCHS": 5, "DATA_DIR": "data"}
    cfg = load_config(namespace, ["--EPOCHS=7"])
    assert cfg.EPOCHS == 7 and cfg.DATA_DIR == "data"
    assert namespace["EPOCHS"] == 5  # the module's own constants are not mutated
    with pytest.raises(SystemExit, match="unknown setting 'EPOCH'"):
        load_config(namespace, ["--EPOCH=7"])


def test_save_config_writes_json(tmp_path):
    cfg = load_config({"EPOCHS": 5, "DATA_DIR": "data"}, ["--EPOCHS=2"])
    save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"EPOCHS": 2, "DATA_DIR": "data"}


def test_imported_upper_case_names_are_not_settings(tmp_path):
    import runpy

    from models.config import constants_of

    script = tmp_path / "stage.py"
    script.write_text("from os import SEEK_SET\nfrom models.paths import CLUSTERS\nSEED = 1\nNAME: str = 'x'\n")
    namespace = runpy.run_path(str(script))
    assert namespace["CLUSTERS"] == "clusters.csv"  # imported, visible in globals()...
    assert constants_of(namespace) == {"SEED": 1, "NAME": "x"}  # ...but not a setting
    # The stage scripts: their own constants only.
    import _3_train_gmvae as stage3
    import _4_deconvolve_bulk as stage4

    assert not {"CLUSTERS", "GENES", "LOSS_PARTS"} & set(constants_of(vars(stage3)))
    assert "CLUSTERS" not in constants_of(vars(stage4)) and "BULK_PROTOCOL" in constants_of(vars(stage4))


SCRIPTS = sorted(p.name for p in Path(__file__).resolve().parents[1].glob("_[0-9]_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_docstring_and_every_setting_then_exits_0(script):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / script), "--help"], capture_output=True, text=True,
                            cwd=repo, timeout=120)
    assert result.returncode == 0, result.stderr
    block = settings_block(repo / script)
    assert block and "DATA_DIR" in block
    first_doc_line = ast.get_docstring(ast.parse((repo / script).read_text())).splitlines()[0]
    assert result.stdout.startswith(first_doc_line)
    listed = re.findall(r"^  --([A-Z0-9_]+)=", result.stdout, flags=re.M)
    assert listed == list(block)  # every setting, in the script's order, and nothing else
    assert "Traceback" not in result.stderr


def test_settings_are_the_rule_block_only(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text('"""Doc."""\n# ---\nEPOCHS = 3  # why three\nPRIOR = "a"  # first line\n'
                      '#             second line\n# ---\nSTREAM = 7  # an RNG offset, not a setting\n')
    namespace = {"__file__": str(script), "__doc__": "Doc.", "EPOCHS": 3, "PRIOR": "a", "STREAM": 7}
    assert settings_block(script) == {"EPOCHS": "why three", "PRIOR": "first line second line"}
    assert constants_of(namespace) == {"EPOCHS": 3, "PRIOR": "a"}
    with pytest.raises(SystemExit, match="unknown setting 'STREAM'"):
        load_config(namespace, ["--STREAM=1"])
    text = help_text(namespace)
    assert text.startswith("Doc.") and "--EPOCHS=3\n      why three" in text and "STREAM" not in text
