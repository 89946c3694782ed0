"""The README's recipes for a user's own configs work as written: a study kept in the user's
own folder (``hydra.searchpath``), and a method composed into a shipped study from the command
line with its YAML (``+method@study.methods.<name>=<name>``)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from kdflow.launch.cli import main
from kdflow.launch.compose import CONFIG_DIR, compose_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(after: str, language: str) -> str:
    """The first ``language`` code block of the README after the line containing ``after``."""
    text = README.read_text()
    return re.search(rf"```{language}\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_a_study_in_the_users_own_folder_runs_through_hydra_searchpath(tmp_path, capsys):
    study = _readme_block("### Your own studies", "yaml")
    (tmp_path / "conf" / "study").mkdir(parents=True)
    (tmp_path / "conf" / "study" / "mystudy.yaml").write_text(study)
    code = main(["run", "--dry-run", "study=mystudy", f"hydra.searchpath=[file://{tmp_path}/conf]",
                 f"output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    # the teacher; per seed the student alone, KD (temperature 4) and its ablation points 2 and
    # 8: 1 + 2 x 4
    assert "9 pending" in out
    assert "kd [temperature=2] resnet14->resnet8 synthetic s1" in out


def test_a_method_composed_from_the_command_line_reads_its_yaml():
    shipped = yaml.safe_load((CONFIG_DIR / "method" / "stablekd.yaml").read_text())
    cfg = compose_config(["study=smoke", "+method@study.methods.stablekd=stablekd",
                          "study.methods.stablekd.kd_temperature=2"])
    composed = dict(cfg.study.methods.stablekd)
    assert composed == {**shipped, "kd_temperature": 2}
