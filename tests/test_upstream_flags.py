"""Tests of library/upstream_flags.py: every sd-scripts flag and dataset key has one class here, the code reads every
implemented flag, the parser / loaders / docs take their behaviour from the registry."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import voluptuous as vol

from library import dataset_config, upstream_flags
from library.config import COMPAT_ONLY, NOT_SUPPORTED, UNUSED_GROUP, build_parser, parse_args
from library.upstream_flags import DATASET_KEYS, FLAGS, Status

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = json.loads((REPO / "tests" / "data" / "sd_scripts_flags.json").read_text(encoding="utf-8"))
UPSTREAM_ALL = set(UPSTREAM["train_network.py"]) | set(UPSTREAM["sdxl_train_network.py"])
NOT_A_SETTING = {"help", "config_file", "output_config"}


# region reading the code


def _receiver_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def attribute_reads(source: str) -> tuple[set[str], set[str]]:
    """``(names read from an object called args, names read from any other object)`` in ``source``: attribute
    loads (``args.NAME``, ``self.args.NAME``) and ``getattr``/``hasattr`` with a constant name. Assignments and
    strings that merely mention a name do not count."""
    from_args, from_others = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            (from_args if _receiver_name(node.value) == "args" else from_others).add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            (from_args if _receiver_name(node.args[0]) == "args" else from_others).add(node.args[1].value)
    return from_args, from_others


def code_reads() -> tuple[set[str], set[str]]:
    """Attribute reads in the trainer's code, except library/config.py (which only defines and checks flags) and
    the registry itself."""
    sources = [REPO / "train_network.py", REPO / "sdxl_train_network.py"]
    sources += sorted(path for folder in ("library", "networks") for path in (REPO / folder).glob("*.py"))
    from_args, from_others = set(), set()
    for path in sources:
        if path.name in ("config.py", "upstream_flags.py"):
            continue
        args_reads, other_reads = attribute_reads(path.read_text(encoding="utf-8"))
        from_args |= args_reads
        from_others |= other_reads
    return from_args, from_others


def flags_read_through_dataset_settings(other_reads: set[str]) -> set[str]:
    """Flags that ``library.dataset_config`` reads by the name of a settings field (``_lookup``; not the settings only a
    subset gives), where that field is read."""
    argparse_name = {field: dataset_config._ARGPARSE_NAMES.get(field, field) for cls in
                     (dataset_config.SubsetSettings, dataset_config.DatasetSettings) for field in
                     (f.name for f in dataclasses.fields(cls)) if field not in dataset_config.SUBSET_ONLY_SETTINGS}
    return {flag for field, flag in argparse_name.items() if field in other_reads}


def test_the_reader_is_not_fooled_by_mentions():
    from_args, _ = attribute_reads('REFUSED = ("masked_loss",)\nhelp = "args.alpha_mask"\nargs.fp8_base = True\n'
                                   'x = args.seed\ny = getattr(args, "in_json", None)\n')
    assert from_args == {"seed", "in_json"}


# endregion

# region the registry against upstream


def test_every_upstream_flag_has_exactly_one_class():
    groups = [upstream_flags.IMPLEMENTED_FLAGS, upstream_flags.NO_EFFECT_FLAGS, upstream_flags.REFUSED_FLAGS]
    names = [name for group in groups for name in group]
    assert sorted(name for name in names if names.count(name) > 1) == []
    assert set(FLAGS) == UPSTREAM_ALL
    assert set(upstream_flags.SDXL_ONLY_FLAGS) == set(UPSTREAM["sdxl_train_network.py"]) - set(
        UPSTREAM["train_network.py"])


@pytest.mark.parametrize("script", ["train_network.py", "sdxl_train_network.py"])
def test_the_parser_accepts_exactly_the_upstream_flags_and_ours(script):
    sdxl = script.startswith("sdxl")
    ours = {action.dest for action in build_parser(sdxl)._actions} - {"help"}
    assert ours == set(UPSTREAM[script]) | set(upstream_flags.OWN_FLAGS)


# Flags without effect that the code reads only to refuse them where sd-scripts would use them, or to record them
# in the LoRA's ss_* metadata as sd-scripts does.
READ_ONLY_TO_REFUSE_OR_RECORD = {"face_crop_aug_range"}


def test_every_implemented_flag_is_read_and_no_flag_without_effect_is():
    from_args, from_others = code_reads()
    read = from_args | flags_read_through_dataset_settings(from_others)
    silent, lying = [], []
    for action in build_parser(sdxl=True)._actions:
        if action.dest in NOT_A_SETTING:
            continue
        entry = FLAGS.get(action.dest)
        implemented = entry is None or entry.status is Status.IMPLEMENTED  # entry None: our own flags
        if implemented and action.dest not in read:
            silent.append(action.dest)
        if (entry is not None and entry.status is Status.NO_EFFECT and action.dest in read
                and action.dest not in READ_ONLY_TO_REFUSE_OR_RECORD):
            lying.append(action.dest)
    assert silent == []
    assert lying == []


def _schema_keys(schema: dict) -> set[str]:
    return {str(key.schema) if isinstance(key, vol.Marker) else key for key in schema}


def test_every_dataset_config_key_has_one_class_and_is_read():
    schema_keys = (_schema_keys(dataset_config._SUBSET_SCHEMA) | _schema_keys(dataset_config._DATASET_SCHEMA)
                   | _schema_keys(dataset_config._GENERAL_SCHEMA)) - {"subsets"}
    assert schema_keys == set(DATASET_KEYS)
    groups = [upstream_flags.IMPLEMENTED_DATASET_KEYS, upstream_flags.NO_EFFECT_DATASET_KEYS,
              upstream_flags.REFUSED_DATASET_KEYS]
    assert sum(len(group) for group in groups) == len(DATASET_KEYS)
    _, from_others = code_reads()
    fields = {f.name for cls in (dataset_config.SubsetSettings, dataset_config.DatasetSettings)
              for f in dataclasses.fields(cls)}
    implemented = set(upstream_flags.IMPLEMENTED_DATASET_KEYS)
    assert sorted(implemented - fields) == []  # every implemented key is a setting ...
    assert sorted(key for key in implemented if key not in from_others) == []  # ... that the code reads


# endregion

# region what the parser and the loaders take from it


def test_help_of_flags_that_are_not_implemented_comes_from_the_registry():
    actions = {action.dest: action for action in build_parser(sdxl=True)._actions}
    for name, entry in FLAGS.items():
        if entry.status is Status.NO_EFFECT:
            assert actions[name].help == f"{COMPAT_ONLY} {entry.note}", name
        elif entry.status is Status.REFUSED:
            assert actions[name].help == f"{NOT_SUPPORTED} {entry.note}", name
    titles = {group.title: [a.dest for a in group._group_actions] for group in build_parser()._action_groups}
    assert "initial_step" in titles[UNUSED_GROUP] and "deepspeed" in titles[UNUSED_GROUP]


@pytest.mark.parametrize("argv", [["--metadata_thumbnail", "a.png"], ["--huggingface_repo_id", "me/lora"],
                                  ["--deepspeed"], ["--initial_step", "10"], ["--dataset_class", "my.Dataset"]])
def test_refused_flags_stop_with_the_registry_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    name = argv[0][2:]
    err = capsys.readouterr().err
    assert f"error: --{name} is an sd-scripts option this trainer does not support: {FLAGS[name].note}" in err


@pytest.mark.parametrize(("line", "name"), [('metadata_trigger_phrase = "sks"', "metadata_trigger_phrase"),
                                            ('huggingface_repo_id = "me/lora"', "huggingface_repo_id"),
                                            ("[training_arguments]\nzero_stage = 3", "zero_stage")])
def test_refused_keys_in_a_config_file_are_an_error_naming_key_and_file(tmp_path, capsys, line, name):
    config = tmp_path / "gui.toml"
    config.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        parse_args(["--config_file", str(config)])
    err = capsys.readouterr().err
    assert f"error: key '{name}' in {config} is an sd-scripts option this trainer does not support" in err


def test_refused_keys_at_their_default_or_empty_pass(tmp_path):
    config = tmp_path / "gui.toml"
    config.write_text('masked_loss = false\nhuggingface_repo_id = ""\nzero_stage = 2\n', encoding="utf-8")
    args = parse_args(["--config_file", str(config)])
    assert args.masked_loss is False and args.zero_stage == 2


def test_no_effect_flags_are_warned_about_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="library.config"):
        parse_args(["--skip_until_initial_step", "--highvram"])
    for name in ("skip_until_initial_step", "highvram"):
        assert f"--{name} is accepted for compatibility with sd-scripts but has no effect here: " \
               f"{FLAGS[name].note}" in caplog.text


def test_gui_bookkeeping_keys_are_warned_with_the_reason(tmp_path, caplog):
    config = tmp_path / "gui.toml"
    config.write_text("epoch = 4\nnoise_offset_type = \"Original\"\nstop_text_encoder_training = 0\n",
                      encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="library.config"):
        parse_args(["--config_file", str(config)])
    for key, note in upstream_flags.CONFIG_FILE_ONLY.items():
        assert f"'{key}' is ignored: {note}" in caplog.text


@pytest.mark.parametrize(("key", "value"), [("custom_attributes", "{ a = 1 }"), ("validation_split", "0.1"),
                                            ("network_multiplier", "0.5"), ("dataset_repeats", "3")])
def test_refused_dataset_keys_stop_with_the_registry_message(tmp_path, key, value):
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n{key} = {value}\n', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        dataset_config.load_dataset_config(config)
    assert f"'datasets[0].subsets[0].{key}' is an sd-scripts option this trainer does not support: " \
           f"{DATASET_KEYS[key].note}" in str(error.value)


# endregion

# region docs/COMPATIBILITY.md


def test_compatibility_doc_tables_match_the_registry():
    import tools.compat_table as compat_table

    text = compat_table.DOC.read_text(encoding="utf-8")
    assert compat_table.with_tables(text) == text, "run: python tools/compat_table.py"
    generated = text[text.index(compat_table.BEGIN):text.index(compat_table.END)]
    for name, entry in FLAGS.items():
        rows = [line for line in generated.splitlines() if line.startswith(f"| `--{name}` |")]
        assert rows == [f"| `--{name}` | {entry.status.value} | {entry.note} |"], name


# endregion
