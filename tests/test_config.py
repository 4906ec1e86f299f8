"""Config schema: YAML, overrides, typed errors with did-you-mean, documented fields."""
import dataclasses

import pytest

from hfrl.config import Config, describe, dump_yaml, field_docs, load_config, parse_override


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("placement:\n  mode: split\nroles:\n  actor: {tp: 2, tg: 1}\n"
                    "distributed: {timeout_s: 30}\n")
    cfg = load_config(path, ["roles.actor.tp=4", "placement.pools={actor: 4, critic: [4, 5]}"])
    assert cfg.placement.mode == "split"
    assert cfg.roles.actor.tp == 4 and cfg.roles.actor.tg == 1   # file value kept, tp overridden
    assert cfg.distributed.timeout_s == 30.0 and isinstance(cfg.distributed.timeout_s, float)
    assert cfg.placement.pools == {"actor": 4, "critic": [4, 5]}
    assert cfg.roles.cost.enabled is False          # partial sections keep their own defaults
    assert load_config(None, ["roles.cost.tp=2"]).roles.cost.enabled is False


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["roles.actor.tp=2", "placement.mode=standalone"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override,error,match", [
    ("roles.actor.tpp=2", ValueError,
     r"unknown config key 'roles.actor.tpp'; did you mean 'roles.actor.tp'\?"),
    ("rolse.actor.tp=2", ValueError, r"unknown config key 'rolse'; did you mean 'roles'\?"),
    ("roles.actor.tp=two", TypeError, r"roles.actor.tp: expected int, got str 'two'"),
    ("roles.actor.tp=true", TypeError, r"roles.actor.tp: expected int, got bool True"),
    ("distributed.timeout_s=[1]", TypeError, r"distributed.timeout_s: expected float"),
    ("roles.actor=3", TypeError, r"roles.actor: expected a mapping"),
    ("placement.pools={a: x}", TypeError, r"placement.pools.a: expected int \| list\[int\]"),
    ("roles.actor.tp", ValueError, r"not of the form section.key=value"),
])
def test_bad_overrides(override, error, match):
    with pytest.raises(error, match=match):
        load_config(None, [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="expected a mapping at the top level"):
        load_config(bad)


def test_override_values_are_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    # YAML 1.1 reads 1e-3 as a string; float fields accept it, in files and overrides alike.
    assert load_config(None, ["distributed.timeout_s=1e-3"]).distributed.timeout_s == 1e-3
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield from _sections(type(default))


def test_every_field_is_documented():
    for cls in _sections(Config):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    lines = describe()
    assert any(line.strip().startswith("roles.actor.tg (int | None, default None)")
               for line in lines)
