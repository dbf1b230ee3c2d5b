import json

import pytest
import torch

from avatars import base_model
from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.models.base_networks import build_unet, build_vae


def _tiny_diffusers_dir(root, with_text_encoder: bool):
    config = tiny_config()
    torch.manual_seed(7)
    build_unet(config.unet, 4, 4, 16).save_pretrained(root / "unet")
    build_vae(config.vae, 64).save_pretrained(root / "vae")
    if with_text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        (root / "tok_src").mkdir()
        (root / "tok_src" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
        (root / "tok_src" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(root / "tok_src" / "vocab.json"), str(root / "tok_src" / "merges.txt"),
                      model_max_length=77).save_pretrained(root / "tokenizer")
        CLIPTextModel(CLIPTextConfig(vocab_size=3, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                     eos_token_id=1, pad_token_id=1)).save_pretrained(root / "text_encoder")
    return config


def test_missing_base_model_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--base-model"):
        DiffusionAvatarsModel(tiny_config(), base_model=tmp_path / "nope")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        base_model.check_base_model_dir(tmp_path)


def test_load_local_base_and_empty_prompt(tmp_path):
    config = _tiny_diffusers_dir(tmp_path, with_text_encoder=True)
    embedding = base_model.compute_empty_prompt_embedding(tmp_path)
    assert embedding.shape == (1, 77, 32)
    base_model.main(["--base-model", str(tmp_path)])  # CLI caches it beside the base model
    cached = tmp_path / base_model.EMPTY_PROMPT_FILE
    torch.testing.assert_close(base_model.load_empty_prompt_embedding(cached), embedding)

    model = DiffusionAvatarsModel(config, base_model=tmp_path)
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    for name, p in loaded.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[name], p, rtol=0, atol=0)
    torch.testing.assert_close(model.empty_prompt_embedding, embedding)

    # checkpoints remember the base model; the text encoder is not needed to load them
    model.save_pretrained(tmp_path / "ckpt")
    for sub in ("text_encoder", "tokenizer"):
        for f in sorted((tmp_path / sub).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (tmp_path / sub).rmdir()
    cached.unlink()
    again = DiffusionAvatarsModel.from_pretrained(tmp_path / "ckpt")
    assert again.base_model == str(tmp_path)
    torch.testing.assert_close(again.empty_prompt_embedding, embedding)


def test_base_model_must_match_config(tmp_path):
    _tiny_diffusers_dir(tmp_path, with_text_encoder=False)
    bad = tiny_config()
    bad.unet.cross_attention_dim = 64
    emb = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DiffusionAvatarsModel(bad, base_model=tmp_path, empty_prompt_embedding=emb)


def test_base_model_upcast_attention_must_match_config(tmp_path):
    import dataclasses

    _tiny_diffusers_dir(tmp_path, with_text_encoder=False)
    config = tiny_config()
    upcast = dataclasses.replace(config, unet=dataclasses.replace(config.unet, upcast_attention=True))
    with pytest.raises(ValueError, match="upcast_attention"):
        DiffusionAvatarsModel(upcast, base_model=tmp_path, empty_prompt_embedding=torch.zeros(1, 77, 32))


@pytest.mark.parametrize("kind", ["epsilon", None, "v_prediction"])
def test_a_base_that_predicts_the_noise_is_refused_naming_its_scheduler_config(tmp_path, kind):
    """SD 2.1-base (512, epsilon) has the same layout as SD 2.1 (768, v): its output would be read as v without
    an error. Its scheduler config says which it is (no prediction_type: diffusers' default, epsilon)."""
    from common.io import DataError

    _tiny_diffusers_dir(tmp_path, with_text_encoder=False)
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "DDIMScheduler"} | ({"prediction_type": kind} if kind else {})
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    load = lambda: DiffusionAvatarsModel(tiny_config(), base_model=tmp_path,  # noqa: E731
                                         empty_prompt_embedding=torch.zeros(1, 77, 32))
    if kind == "v_prediction":
        load()
    else:
        with pytest.raises(DataError, match=r"scheduler_config.json: prediction_type is 'epsilon'"):
            load()


@pytest.mark.parametrize("text", [b"{not json", b"[1, 2]", b"\xff\xfe{}"])
def test_an_unreadable_scheduler_config_is_refused_naming_it(tmp_path, text):
    """Not JSON, JSON that is not an object, or bytes that are not UTF-8: a DataError naming the file, not a
    traceback from deep inside the loader."""
    from common.io import DataError

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(text)
    with pytest.raises(DataError, match=r"scheduler_config.json: unreadable scheduler config"):
        base_model.check_prediction_type(tmp_path)


def test_an_embedding_of_another_width_is_refused_naming_its_file(tmp_path):
    """A cached empty-prompt embedding of another base (another cross_attention_dim) names the file."""
    from safetensors.torch import save_file

    from common.io import DataError

    config = _tiny_diffusers_dir(tmp_path, with_text_encoder=False)
    cached = tmp_path / base_model.EMPTY_PROMPT_FILE
    save_file({base_model.EMPTY_PROMPT_KEY: torch.zeros(1, 77, 16)}, str(cached))
    with pytest.raises(DataError, match=r"has shape \(1, 77, 16\), the UNet needs \(1, L, 32\)") as error:
        DiffusionAvatarsModel(config, base_model=tmp_path)
    assert error.value.path == cached
