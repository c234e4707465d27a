"""The shipped pretrained base: loads, knows its pretraining skills, fails the new tasks."""

import pytest
import torch

from lab import BASE_MODEL_PATH, add_lora, get_task, load_base_model, save_base_model, train
from lab.tasks import FINETUNE_TASKS, PRETRAIN_TASKS


@pytest.fixture(scope="module")
def base():
    return load_base_model(device="cpu")


def test_checkpoint_is_small_and_tied(base):
    assert BASE_MODEL_PATH.stat().st_size < 4 * 2**20
    assert base.head.weight is base.tok_emb.weight
    assert not base.training


@pytest.mark.parametrize("name", PRETRAIN_TASKS)
def test_base_has_learned_each_pretraining_skill(base, name):
    assert get_task(name).evaluate(base)["accuracy"] >= 0.9


@pytest.mark.parametrize("name", FINETUNE_TASKS)
def test_base_cannot_do_the_finetuning_tasks(base, name):
    assert get_task(name).evaluate(base)["accuracy"] <= 0.2


def test_lora_on_q_and_v_learns_a_new_task_from_the_base():
    model = load_base_model(device="cpu")
    add_lora(model, rank=8, alpha=16)
    result = train(model, get_task("rotate"), steps=150, lr=2e-2, batch_size=64, progress=False)
    assert result.heldout["accuracy"] >= 0.8


def test_save_then_load_round_trips_exactly(base, tmp_path):
    path = save_base_model(base, tmp_path / "copy.safetensors", info={"note": "test"})
    again = load_base_model(device="cpu", path=path)
    x = get_task("copy").heldout_inputs[:8]
    assert torch.equal(base(x), again(x))
    assert again.head.weight is again.tok_emb.weight


def test_corrupt_or_missing_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BASE_MODEL_PATH.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable base model file"):
        load_base_model(device="cpu", path=bad)
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        load_base_model(device="cpu", path=tmp_path / "missing.safetensors")


def test_config_is_read_from_the_metadata_alone(base, tmp_path):
    from lab.base import load_base_config

    assert load_base_config() == base.config
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        load_base_config(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable base model file"):
        load_base_config(junk)
