"""The patches of other packages (`amm_trl.patches`): the installed versions are the tested ones, a vanished target is
an error naming package and versions, an untested version warns once, and every patch is undone after its block."""


import pytest
from packaging.specifiers import SpecifierSet

from amm_trl import patches


def test_installed_versions_are_the_tested_ones():
    import transformers
    import trl

    assert trl.__version__ in patches.TESTED["trl"] and transformers.__version__ in patches.TESTED["transformers"]


def test_a_vanished_target_is_an_error_naming_the_package_and_versions():
    with pytest.raises(RuntimeError, match=r"amm-trl patches trl.trainer.distillation_trainer.NoSuchClass, which "
                                           r"this trl version does not have; install trl<1.17,>=1.16\."):
        patches.target("trl", "trl.trainer.distillation_trainer", "NoSuchClass")
    assert patches.target("trl", "trl.trainer.distillation_trainer", "NoSuchClass", required=False) is None


def test_an_untested_version_warns_once(monkeypatch):
    monkeypatch.setitem(patches.TESTED, "trl", SpecifierSet("<1.0"))
    patches._warn_untested.cache_clear()
    with pytest.warns(UserWarning, match=r"amm-trl patches trl 1\.16\.\d+; it was tested with trl <1\.0"):
        patches.target("trl", "trl.trainer.distillation_trainer", "VLLMGeneration")
    patches._warn_untested.cache_clear()


def test_patches_are_undone_after_their_block():
    import transformers.trainer as hf_trainer
    import trl.trainer.distillation_trainer as distillation

    generation, api = distillation.VLLMGeneration, hf_trainer.hf_api
    with patches.trl_builds_generation(dict), patches.hub_ignores(["x"]):
        assert distillation.VLLMGeneration is dict and hf_trainer.hf_api is not api
    assert distillation.VLLMGeneration is generation and hf_trainer.hf_api is api

    class Model:
        def generate(self, *args, **kwargs):
            return kwargs

    model = Model()
    with patches.extra_logits_processor(model, lambda mask: ("processor", mask)):
        assert list(model.generate(attention_mask=7)["logits_processor"]) == [("processor", 7)]
    assert "logits_processor" not in model.generate(attention_mask=7)
