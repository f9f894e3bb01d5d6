"""Bad input to the `ray-unlearn` command: exit 2, one message on stderr and, with --json,
one JSON error document on stdout; every config problem at once, each blamed on its source,
with the allowed keys and a did-you-mean; reported before torch or Ray are imported.

No Ray starts here: each case is refused while validating (a second or two each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ray_unlearn.platform.methods.approximate import ALGORITHMS
from ray_unlearn.platform.methods.rum.config import ALGORITHM_NAMES

CLI = [sys.executable, "-m", "ray_unlearn.cli"]


def run(*args: str) -> tuple[int, list[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_UNLEARN_STORAGE")}
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, [ln for ln in p.stdout.splitlines() if ln.strip()], p.stderr


def refused(*args: str) -> dict:
    """Run with and without --json: exit 2 both times, one JSON document, no traceback."""
    code, out, stderr = run(*args, "--json")
    assert code == 2, f"exit {code}\n{out}\n{stderr[-2000:]}"
    assert len(out) == 1, f"stdout must hold one JSON document, got {out}"
    doc = json.loads(out[0])
    assert set(doc) <= {"error", "problems"} and doc["error"]
    assert "Traceback" not in stderr
    code, out, stderr = run(*args)
    assert code == 2 and "Traceback" not in stderr
    # the same message for a person (typer may fold it into a box: compare the words)
    words = " ".join(stderr.replace("│", " ").split())
    assert " ".join(doc["error"].splitlines()[0].split()) in words
    return doc


BAD_RUN = """\
name: bad
partition:
  shards: 0
  slicez: 3
training:
  epoch: 3
unlearning:
  strategy: sissa
"""


def test_every_config_problem_at_once_with_source_allowed_keys_and_suggestion(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD_RUN)
    doc = refused("train", "--config", str(cfg), "model.hiden=[3]", "--storage", str(tmp_path))
    by_key = {p["key"]: p for p in doc["problems"]}
    assert set(by_key) == {
        "partition.shards",
        "partition.slicez",
        "training.epoch",
        "model.hiden",
        "unlearning.strategy",  # a cross-section check, reported with the field errors
    }
    assert by_key["partition.slicez"]["did_you_mean"] == "slices"
    assert by_key["partition.slicez"]["allowed"] == ["shards", "slices", "group_by"]
    assert by_key["training.epoch"]["did_you_mean"] == "epochs"
    assert by_key["model.hiden"]["did_you_mean"] == "hidden"
    assert by_key["model.hiden"]["source"] == "override 'model.hiden=[3]'"
    assert by_key["partition.shards"]["source"] == f"in {cfg}"
    assert "did you mean 'sisa'" in by_key["unlearning.strategy"]["message"]
    assert "5 problem(s)" in doc["error"]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_problem_of_a_field_left_out_is_not_reported_twice(tmp_path):
    # shards fails; the cross-section check (workers <= shards) must not then be run
    # against the default shards and blame the user for a value they never wrote
    doc = refused(
        "train", "--config", "configs/digits.yaml", "partition.shards=0",
        "training.num_workers=6", "--storage", str(tmp_path),
    )  # fmt: skip
    assert [p["key"] for p in doc["problems"]] == ["partition.shards"]


def test_sweep_typos_all_in_one_report(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        textwrap.dedent(f"""\
        name: s
        base_config: {os.path.abspath("configs/digits.yaml")}
        serch: {{}}
        stream: {{deletion: 3}}
        search:
          space:
            partition.shard: [2, 4]
            unlearning.strategy: [sisa, hss]
            serving.policy: [lazy-wiat]
        """)
    )
    doc = refused("sweep", "--config", str(sweep), "stream.seed=-1", f"storage={tmp_path}")
    text = doc["error"]
    for needle in (
        "serch (in",  # the sweep file's own keys
        "did you mean 'search'",
        "did you mean 'deletions'",
        "stream.seed (override 'stream.seed=-1')",
        "did you mean 'lazy-wait'",  # the policy dimension
        "did you mean 'shards'",  # a trial's run-config key
        "unknown strategy 'hss'",  # a trial's cross-section check
        "4 trials",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


BAD_INPUTS = {
    "missing option": ["forget", "--owner", "o"],
    "unknown command": ["bogus"],
    "wrong type": ["audit", "--run", "r", "--sample", "abc"],
    "no such run": ["status", "--run", "nope", "--request-id", "x"],
    "owner and samples": ["forget", "--run", "r", "--owner", "o", "--samples", "1"],
    "config file missing": ["train", "--config", "no/such.yaml"],
    "override not key=value": ["train", "--config", "configs/digits.yaml", "shards"],
    "override not YAML": ["train", "--config", "configs/digits.yaml", "model.hidden=[64"],
    "override into a value": ["train", "--config", "configs/digits.yaml", "seed.x=1"],
    "demo bad override": ["demo", "partition.slices=0"],
    "sweep file missing": ["sweep", "--config", "no/such.yaml"],
    "detach without cluster": ["serve", "--run", "r", "--detach"],
}


@pytest.mark.parametrize("args", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_exits_2_with_one_message(args, tmp_path):
    refused(*args, *(["--storage", str(tmp_path)] if args[0] in ("status", "train") else []))


def test_a_bad_config_is_reported_without_importing_torch_or_ray(tmp_path):
    # nor pyarrow / scikit-learn (the data package re-exports lazily): a typo is reported in
    # well under a second
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD_RUN)
    probe = textwrap.dedent(f"""\
        import sys
        from ray_unlearn.cli import app
        for argv in (["train", "--config", {str(cfg)!r}], ["demo", "--config", {str(cfg)!r}],
                     ["sweep", "--config", "configs/sweep.yaml", "space.partition.shard=[2]"]):
            try:
                app(argv)
            except SystemExit as e:
                assert e.code == 2, (argv, e.code)
        heavy = ("torch", "ray", "mlflow", "pyarrow", "sklearn")
        print(sorted(m for m in heavy if m in sys.modules))
        """)
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_rum_algorithm_names_match_the_algorithms():
    # the config names them without importing torch; the two lists must not drift
    assert set(ALGORITHM_NAMES) == set(ALGORITHMS)


def test_help_has_no_type_placeholders_or_rst_and_every_option_has_help():
    from typer.main import get_command
    from typer.testing import CliRunner

    from ray_unlearn.cli import app

    runner = CliRunner()
    group = get_command(app)
    for name, cmd in [("", group), *group.commands.items()]:
        res = runner.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "100"})
        assert res.exit_code == 0, (name, res.output)
        for bad in ("<bool>", "<list[", "<str>", "<int>", "``", ":func:", ":class:"):
            assert bad not in res.output, f"{name} --help shows {bad!r}:\n{res.output}"
        for param in cmd.params:
            assert param.param_type_name == "argument" or getattr(param, "help", None), (
                f"{name} {param.name} has no help"
            )


def test_storage_option_and_variable_reach_demo_and_sweep(tmp_path, monkeypatch):
    """`--storage` / RAY_UNLEARN_STORAGE replace the config's storage for demo and sweep as
    for train (checked where the command hands over, without starting Ray)."""
    import types

    from typer.testing import CliRunner

    from ray_unlearn import api
    from ray_unlearn.cli import app

    seen = {}

    def fake_sweep(spec, address=None):
        seen["sweep"] = spec.base["storage"]
        raise ValueError("stop here")

    def fake_demo(config, overrides, deletions):
        seen["demo"] = [o for o in overrides if o.startswith("storage=")]
        raise ValueError("stop here")

    monkeypatch.setattr(api, "sweep", fake_sweep)
    monkeypatch.setitem(
        sys.modules, "ray_unlearn.train.demo", types.SimpleNamespace(run_demo=fake_demo)
    )
    runner = CliRunner()
    root = str(tmp_path / "root")
    res = runner.invoke(app, ["sweep", "--config", "configs/sweep.yaml", "--storage", root])
    assert res.exit_code == 2 and seen["sweep"] == root, res.output
    res = runner.invoke(app, ["demo"], env={"RAY_UNLEARN_STORAGE": root})
    assert res.exit_code == 2 and seen["demo"] == [f"storage={root}"], res.output


def test_demo_finds_its_default_config_from_another_directory(tmp_path, monkeypatch):
    """`ray-unlearn demo` run outside the repository (an editable install) uses the
    repository's configs/digits.yaml, not ./configs (seen here through a bad override)."""
    from typer.testing import CliRunner

    from ray_unlearn.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["demo", "partition.slices=0"], env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    repo_config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits.yaml")
    assert f"invalid config {os.path.realpath(repo_config)}" in res.output
    assert "partition.slices (override 'partition.slices=0')" in res.output
    assert not any(tmp_path.iterdir())


def test_request_table_of_a_pending_request_says_what_is_not_known_yet():
    """A `--no-wait` request (or `status` before execution) has no shards yet: '-' as for its
    unlearning seconds, not an empty cell; `status` has no "total s" (it only reads)."""
    from rich.console import Console

    from ray_unlearn.cli import _request_table

    console = Console(width=120, record=True)
    doc = {"request_id": "r1", "state": "pending", "samples": 4, "shards": [], "seconds": 2.3}
    console.print(_request_table(doc))
    row = [ln for ln in console.export_text().splitlines() if "pending" in ln][0]
    assert [c.strip() for c in row.strip("│ ").split("│")] == [
        "pending",
        "4",
        "-",
        "0",
        "0",
        "-",
        "2.30",
    ]
    status_doc = {k: v for k, v in doc.items() if k != "seconds"}  # what `status` shows
    console.print(_request_table({**status_doc, "state": "done", "shards": [2, 3]}))
    text = console.export_text()
    assert "total s" not in text and "2,3" in text
