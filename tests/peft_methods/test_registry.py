"""Discovery through entry points: built-ins, an installed third-party package, broken plugins."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

import peft_methods
from peft_methods.registry import GROUP, PluginError, load_methods


def test_builtins_and_the_installed_third_party_method_are_listed():
    assert {"lora", "bitfit", "ia3"} <= set(peft_methods.list_methods())
    origins = {ep.name: ep.dist.name for ep in importlib.metadata.entry_points(group=GROUP)}
    assert origins["lora"] == origins["bitfit"] == "peftfleet"
    assert origins["ia3"] == "peftfleet-example-plugin"


def test_unknown_method_lists_what_is_installed():
    with pytest.raises(KeyError, match="unknown PEFT method 'nope'; installed: .*'lora'"):
        peft_methods.get_method("nope")


VALID_METHOD = """
from typing import Literal
from pydantic import Field
from peft_methods import MethodConfig, PeftMethod

class Config(MethodConfig):
    method: Literal["{name}"] = Field(default="{name}", description="the method")

class Method(PeftMethod):
    name = "{name}"
    Config = Config
    inference_overhead = "none"
    def is_adapter_parameter(self, name, config):
        return name.endswith(".bias")
    def _inject(self, model, config):
        pass
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Install fake distributions by writing real .dist-info folders onto sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}\n")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))

    yield install
    peft_methods.refresh()


def _load(tmp_path):
    eps = [
        ep for d in importlib.metadata.distributions(path=[str(tmp_path)]) for ep in d.entry_points if ep.group == GROUP
    ]
    return load_methods(eps)


def test_a_valid_plugin_registers_through_the_real_registry(plugin_dir, tmp_path):
    plugin_dir("good-plugin", {"goodm": "goodm_mod:Method"}, {"goodm_mod": VALID_METHOD.format(name="goodm")})
    peft_methods.refresh()
    assert "goodm" in peft_methods.list_methods()
    assert peft_methods.parse_config({"method": "goodm"}).method == "goodm"


def test_a_broken_plugin_names_its_entry_point(plugin_dir, tmp_path):
    plugin_dir("broken-plugin", {"broken": "broken_mod:Method"}, {"broken_mod": "raise ImportError('needs libfoo')"})
    peft_methods.refresh()
    with pytest.raises(PluginError, match=r"entry point 'broken = broken_mod:Method'.*broken-plugin.*needs libfoo"):
        peft_methods.list_methods()


def test_a_duplicate_name_names_both_entry_points(plugin_dir, tmp_path):
    plugin_dir("dup-a", {"dupm": "dupa:Method"}, {"dupa": VALID_METHOD.format(name="dupm")})
    plugin_dir("dup-b", {"dupm": "dupb:Method"}, {"dupb": VALID_METHOD.format(name="dupm")})
    with pytest.raises(
        PluginError,
        match=r"duplicate method name 'dupm'.*(dupa:Method.*dupb:Method|dupb:Method.*dupa:Method)",
    ):
        _load(tmp_path)


def test_a_plugin_cannot_shadow_a_builtin(plugin_dir, tmp_path):
    plugin_dir("evil", {"lora": "evil_mod:Method"}, {"evil_mod": VALID_METHOD.format(name="lora")})
    peft_methods.refresh()
    with pytest.raises(PluginError, match="duplicate method name 'lora'"):
        peft_methods.list_methods()


@pytest.mark.parametrize(
    "source,message",
    [
        (VALID_METHOD.format(name="Upper"), "must be lower-case"),
        (VALID_METHOD.format(name="other"), "differs from the method's name 'other'"),
        ("class Method:\n    name = 'badm'\n", "not a subclass of peft_methods.PeftMethod"),
        (
            VALID_METHOD.format(name="badm").replace(', description="the method"', ""),
            r"fields \['method'\] have no description",
        ),
        (
            VALID_METHOD.format(name="badm").replace(
                "class Config(MethodConfig):", "class Config(MethodConfig):\n    model_config = {'extra': 'allow'}"
            ),
            "must forbid extra fields",
        ),
        (
            VALID_METHOD.format(name="badm").replace('    name = "badm"', '    name = "badm"\n    Config = int'),
            "must subclass peft_methods.MethodConfig",
        ),
    ],
    ids=["upper-case", "name-mismatch", "not-a-method", "undocumented-field", "extra-allowed", "config-not-pydantic"],
)
def test_malformed_plugins_are_refused(plugin_dir, tmp_path, request, source, message):
    entry = "Upper" if "Upper" in source else "badm"
    module = "bad_" + request.node.callspec.id.replace("-", "_")  # a fresh module name per case
    plugin_dir("bad-plugin", {entry: f"{module}:Method"}, {module: source})
    with pytest.raises(PluginError, match=message):
        _load(tmp_path)
