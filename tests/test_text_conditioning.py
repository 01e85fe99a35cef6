"""Text and class-token conditioning: tokenizer and encoders, captions from metadata and templates,
cross-attention, CFG with the empty prompt, old checkpoints, and end-to-end runs (learned, CLIP, class tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AE, read_metrics, run_py, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image

import difflab
from difflab.checkpoint import atomic_save, load_checkpoint
from difflab.data.captions import CaptionTable, class_captions, fill
from difflab.data.folder import read_folder
from difflab.diffusion import GuidedDenoiser
from difflab.edit import edit_prompts
from difflab.errors import UserError
from difflab.models.conditioned import ClassTokens, ConditionedUNet
from difflab.models.layers import CrossAttentionBlock
from difflab.models.text_encoder import LearnedTextEncoder, WordTokenizer
from difflab.models.unet import UNet
from difflab.trained import diffusion_model_from_state

TEMPLATES = 'dataset.captions.templates=["a {name}","the {name} shape"]'


def one_sentence(text: str) -> bool:
    line = text.strip().splitlines()[-1]
    return line.startswith("error: ") and line.rstrip(".").count(". ") == 0


# ---------------------------------------------------------------- tokenizer and encoder

def test_word_tokenizer_pads_marks_unknown_words_and_starts_every_prompt():
    tok = WordTokenizer.from_captions(["a handwritten seven", "the digit 7"], max_length=5)
    ids = tok(["A handwritten SEVEN!", "", "the digit 7 a handwritten seven"])
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    start, unk = tok.index["<start>"], tok.index["<unk>"]
    assert ids[0].tolist() == [start, tok.index["a"], tok.index["handwritten"], tok.index["seven"], unk]  # "!" unknown
    assert ids[1].tolist() == [start, 0, 0, 0, 0]  # the null prompt: one real token
    assert ids[2, 0] == start and (ids[2] != 0).all()  # cut to max_length
    assert tok.mask(ids).sum(1).tolist() == [5, 1, 5]


def test_learned_encoder_shapes_and_padding_does_not_leak():
    torch.manual_seed(0)
    tok = WordTokenizer.from_captions(["a ring", "a big square"], max_length=6)
    enc = LearnedTextEncoder(tok, width=16, layers=2, heads=4).eval()
    ids = tok(["a ring", "a big square", ""])
    context, mask = enc(ids)
    assert context.shape == (3, 6, 16) and mask.shape == (3, 6) and torch.isfinite(context).all()
    assert mask.sum(1).tolist() == [3, 4, 1]
    # the real tokens do not depend on what the padding positions hold
    with torch.no_grad():
        enc.embed.weight[tok.pad_id] += 10.0
    again, _ = enc(ids)
    torch.testing.assert_close(again[mask], context[mask])


# ---------------------------------------------------------------- captions

def test_captions_from_templates_per_class_and_unknown_placeholder():
    mnist = OmegaConf.create({"name": "mnist"})
    rows = class_captions(mnist, ["a handwritten {word}", "the digit {digit}"])
    assert rows[7] == ["a handwritten seven", "the digit 7"] and len(rows) == 10
    with pytest.raises(UserError, match=r"\{colour\}"):
        fill("a {colour} digit", {"digit": "3"})
    with pytest.raises(UserError, match="templates"):
        class_captions(mnist, [])


def test_caption_table_draws_one_template_per_example():
    ids = torch.arange(2 * 3 * 4).view(2, 3, 4)
    table = CaptionTable(ids, torch.tensor([0, 1, 1]))
    drawn = table.draw(torch.tensor([1, 1, 0, 1] * 50), torch.Generator().manual_seed(0))
    assert drawn.shape == (200, 4)
    assert {tuple(r.tolist()) for r in drawn[:, :1]} <= {(12,), (16,), (20,), (0,), (4,), (8,)}
    assert len({int(r[0]) for r in drawn if r[0] >= 12}) == 3  # every option of class 1 comes up


def _captioned_folder(root: Path, metadata: str, name: str = "metadata.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / f"{i}.png")
    (root / name).write_text(metadata)
    return root


def test_captions_from_metadata_jsonl_and_csv(tmp_path):
    lines = "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"grey level {i}"}) for i in (0, 1, 3))
    data = read_folder(_captioned_folder(tmp_path / "jsonl", lines), 8, 1)
    assert data.captions == ["grey level 0", "grey level 1", "", "grey level 3"]  # 2.png has none: the empty prompt
    assert data.subset(torch.tensor([3, 0])).captions == ["grey level 3", "grey level 0"]
    csv = "file_name,text\n0.png,dark\n2.png,\"light, grey\"\n"
    assert read_folder(_captioned_folder(tmp_path / "csv", csv, "metadata.csv"), 8, 1).captions == ["dark", "", "light, grey", ""]


@pytest.mark.parametrize("metadata, match", [
    ('{"file_name": "0.png", "caption": "x"}\n', "no `text` column"),
    ('{"file_name": "9.png", "text": "x"}\n', "file_name=9.png, which is not an image"),
    ('{"file_name": "0.png", "text": \n', "not JSON"),
])
def test_bad_metadata_is_one_sentence(tmp_path, metadata, match):
    with pytest.raises(UserError, match=match):
        read_folder(_captioned_folder(tmp_path / "f", metadata), 8, 1)


@pytest.mark.slow
def test_bad_metadata_stops_run_py_before_any_work(tmp_path):
    root = _captioned_folder(tmp_path / "f", '{"file_name": "missing.png", "text": "x"}\n')
    run_dir = tmp_path / "run"
    r = run_py(*tiny_overrides(root, tmp_path / "cache"), "dataset.val_size=0", "conditioning=text",
               f"hydra.run.dir={run_dir}")
    assert r.returncode != 0 and "missing.png" in r.stderr and one_sentence(r.stderr), r.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------- cross-attention

def _random_output(block: CrossAttentionBlock) -> CrossAttentionBlock:
    torch.nn.init.normal_(block.proj_out.weight)  # zero-initialised: a fresh block is the identity
    return block


def test_cross_attention_reads_the_context_and_skips_padding():
    torch.manual_seed(0)
    block = _random_output(CrossAttentionBlock(16, context_dim=8, head_channels=8, norm_groups=4)).eval()
    x, context = torch.randn(2, 16, 5, 5), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = block(x, context, mask)
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, torch.randn(2, 3, 8), mask))  # another context, another output
    padded = context.clone()
    padded[0, 2] = 100.0  # a masked position changes nothing
    torch.testing.assert_close(block(x, padded, mask)[0], out[0])
    maps = block.attention_maps(x, context, mask)
    assert maps.shape == (2, 2, 25, 3)  # batch, heads (16 // 8), positions, tokens
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 25))
    assert (maps[0, :, :, 2] == 0).all()


def test_fresh_cross_attention_unet_has_unchanged_defaults():
    plain = UNet(1, 8, 16, [1, 2], 1, [], head_channels=16, norm_groups=8, num_classes=3)
    same = UNet(1, 8, 16, [1, 2], 1, [], head_channels=16, norm_groups=8, num_classes=3, cross_attention_resolutions=[])
    assert list(plain.state_dict()) == list(same.state_dict())  # cross-attention is off by default
    cross = UNet(1, 8, 16, [1, 2], 1, [], head_channels=16, norm_groups=8, cross_attention_resolutions=[4],
                 context_dim=8)
    names = [n for n, m in cross.named_modules() if isinstance(m, CrossAttentionBlock)]
    assert "middle.2" in names and any(n.startswith("down.") for n in names) and any(n.startswith("up.") for n in names)


def test_changing_the_prompt_changes_the_unet_output():
    torch.manual_seed(0)
    tok = WordTokenizer.from_captions(["a ring", "a square"], max_length=4)
    unet = UNet(1, 8, 16, [1, 2], 1, [], head_channels=16, norm_groups=8, cross_attention_resolutions=[4], context_dim=8)
    for m in unet.modules():
        if isinstance(m, CrossAttentionBlock):
            _random_output(m)
    torch.nn.init.normal_(unet.out[-1].weight)
    net = ConditionedUNet(unet, LearnedTextEncoder(tok, 8, 1, 2)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    ring, square = net(x, t, net.tokenize(["a ring"] * 2)), net(x, t, net.tokenize(["a square"] * 2))
    assert not torch.allclose(ring, square)
    torch.testing.assert_close(net(x, t, None), net(x, t, net.tokenize(["", ""])))  # y=None: the empty prompt


def test_cfg_uses_the_empty_prompt_as_null_condition():
    from difflab.diffusion import FlowProcess

    torch.manual_seed(0)
    tok = WordTokenizer.from_captions(["a ring"], max_length=4)
    unet = UNet(1, 8, 16, [1, 2], 1, [], head_channels=16, norm_groups=8, cross_attention_resolutions=[], context_dim=8)
    torch.nn.init.normal_(unet.out[-1].weight)
    for m in unet.modules():
        if isinstance(m, CrossAttentionBlock):
            _random_output(m)
    net = ConditionedUNet(unet, LearnedTextEncoder(tok, 8, 1, 2)).eval()
    process, y = FlowProcess(), net.tokenize(["a ring", "a ring"])
    x, level = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    guided = GuidedDenoiser(net, process, y, null_y=net.null_condition(), cfg_scale=3.0, clip_x0=False)
    x_in, c = process.net_inputs(x, level)
    expected = net(x_in, c, None) + 3.0 * (net(x_in, c, y) - net(x_in, c, None))
    torch.testing.assert_close(guided._predict(x, level), expected)


def test_class_tokens_null_class():
    tokens = ClassTokens(num_classes=3, width=8)
    context, mask = tokens(torch.tensor([0, 3]))
    assert context.shape == (2, 1, 8) and mask is None


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_text_learned_end_to_end_and_sample_prompts(shapes_dir, tmp_path, cache):
    base = tiny_overrides(shapes_dir, cache)
    train = tmp_path / "train"
    r = run_py(*base, "conditioning=text", TEMPLATES, "guidance=cfg", f"hydra.run.dir={train}")
    assert r.returncode == 0, r.stderr[-3000:]
    samples = np.load(train / "samples" / "samples.npz")
    assert list(samples["prompts"][:1]) == ["a ring"] and samples["labels"].tolist() == [0] * 4 + [1] * 4
    state = load_checkpoint(train / "checkpoints" / "last.pt")
    assert "ring" in state["meta"]["vocabulary"] and state["meta"]["class_prompts"] == ["a ring", "a square"]
    out = tmp_path / "sample"
    r = run_py(*base, "mode=sample", f"ckpt={train}/checkpoints/last.pt", "sampler=ddim",
               "sample.prompts=[a ring,the square shape]", "guidance=cfg", "guidance.scale=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    samples = np.load(out / "samples" / "samples.npz")
    assert samples["prompts"].tolist() == ["a ring", "the square shape"] * 4 and samples["images"].shape[0] == 8
    assert read_metrics(out)["sampled_with"]["prompts"] == ["a ring", "the square shape"]
    r = run_py(*base, "mode=sample", f"ckpt={train}/checkpoints/last.pt", "guidance=classifier", f"hydra.run.dir={out}2")
    assert r.returncode != 0 and "conditioned on prompts" in r.stderr and one_sentence(r.stderr)

    # the API draws what mode=sample wrote, for the same prompts and settings
    drawn = difflab.load(train).sample(8, prompts=["a ring", "the square shape"], sampler="ddim", guidance_scale=2,
                                       overrides=["sampler.steps=5", "sample.batch_size=4"])
    assert drawn.prompts == samples["prompts"].tolist()
    assert np.array_equal(drawn.images.permute(0, 2, 3, 1).numpy(), samples["images"])

    # mode=edit conditioned on a prompt: every sample of the first run edited towards squares
    edit = tmp_path / "edit"
    r = run_py(*base, "mode=edit", f"ckpt={train}/checkpoints/last.pt", f"edit.images={train}/samples/samples.npz",
               "edit.prompts=[the square shape]", "edit.strength=0.8", f"hydra.run.dir={edit}")
    assert r.returncode == 0, r.stderr[-3000:]
    edited = np.load(edit / "edits" / "edited.npz")
    assert edited["prompts"].tolist() == ["the square shape"] * 8 and edited["images"].shape == (8, 16, 16, 1)
    assert read_metrics(edit)["edited_with"]["prompts"] == ["the square shape"] * 8
    r = run_py(*base, "mode=edit", f"ckpt={train}/checkpoints/last.pt", f"edit.images={train}/samples/samples.npz",
               "edit.prompts=[a ring,a square,a ring]", f"hydra.run.dir={edit}2")
    assert r.returncode != 0 and "edit.prompts has 3 prompts for 8 images" in r.stderr and one_sentence(r.stderr)


def test_edit_prompts_one_for_all_one_per_image_or_from_the_classes():
    meta = {"class_prompts": ["a ring", "a square"]}
    assert edit_prompts(["a ring"], None, 3, meta) == (["a ring"] * 3, None)
    assert edit_prompts(["a", "b"], None, 2, meta)[0] == ["a", "b"]
    prompts, labels = edit_prompts(None, [1, 0], 2, meta)
    assert prompts == ["a square", "a ring"] and labels.tolist() == [1, 0]
    assert edit_prompts(None, None, 2, meta, given=torch.tensor([0, 1]))[0] == ["a ring", "a square"]
    for spec, labels, message in [(None, None, "needs one: add edit.prompts="), ([], None, "non-empty list"),
                                  (["a", "b"], None, "2 prompts for 3 images")]:
        with pytest.raises(UserError, match=message):
            edit_prompts(spec, labels, 3, meta)
    with pytest.raises(UserError, match="needs one"):  # captions of a folder: no class to name
        edit_prompts(None, 1, 3, {"prompts": ["a cat"]})


@pytest.mark.slow
def test_sample_prompts_on_a_class_model_is_one_sentence(shapes_dir, tmp_path, cache):
    base = tiny_overrides(shapes_dir, cache)
    r = run_py(*base, f"hydra.run.dir={tmp_path / 't'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_py(*base, "mode=sample", f"ckpt={tmp_path / 't'}/checkpoints/last.pt", "sample.prompts=[a ring]",
               f"hydra.run.dir={tmp_path / 's'}")
    assert r.returncode != 0 and "sample.prompts" in r.stderr and one_sentence(r.stderr)
    r = run_py(*base, "mode=edit", f"ckpt={tmp_path / 't'}/checkpoints/last.pt", "edit.prompts=[a ring]",
               f"edit.images={tmp_path / 't'}/samples/samples.npz", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode != 0 and "edit.prompts asks for prompts" in r.stderr and one_sentence(r.stderr)


@pytest.mark.slow
def test_old_checkpoint_without_cross_attention_still_loads_and_samples(shapes_dir, tmp_path, cache):
    """A checkpoint whose config predates the conditioning keys (no conditioning, text_encoder,
    unet.cross_attention_resolutions or unet.context_dim)."""
    base = tiny_overrides(shapes_dir, cache)
    r = run_py(*base, "guidance=cfg", f"hydra.run.dir={tmp_path / 't'}")
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(read_metrics(tmp_path / "t")["checkpoint"])  # trained now, or the cached copy
    for key in ("conditioning", "text_encoder"):
        del state["config"][key]
    for key in ("cross_attention_resolutions", "context_dim"):
        del state["config"]["unet"][key]
    del state["config"]["dataset"]["captions"]
    old = tmp_path / "old.pt"
    atomic_save(state, old)
    model = diffusion_model_from_state(load_checkpoint(old), torch.device("cpu"))
    assert not model.text and not any(isinstance(m, CrossAttentionBlock) for m in model.net.modules())
    r = run_py(*base, "mode=sample", f"ckpt={old}", "guidance=cfg", f"hydra.run.dir={tmp_path / 's'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(tmp_path / "s" / "samples" / "samples.npz")["labels"].tolist() == [0] * 4 + [1] * 4


@pytest.mark.slow
def test_class_tokens_end_to_end_latent_flow(shapes_dir, tmp_path, cache):
    run_dir = tmp_path / "run"
    r = run_py(*tiny_overrides(shapes_dir, cache, objective="flow"), "autoencoder=kl", *TINY_AE,
               "conditioning=class_tokens", "guidance=cfg", "sampler=heun", "sampler.steps=3", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    model = diffusion_model_from_state(load_checkpoint(run_dir / "checkpoints" / "last.pt"), torch.device("cpu"))
    assert isinstance(model.net, ConditionedUNet) and isinstance(model.net.condition, ClassTokens)
    assert model.latent is not None
    assert np.load(run_dir / "samples" / "samples.npz")["labels"].tolist() == [0] * 4 + [1] * 4


def _printable_bytes() -> list[int]:
    """The bytes byte-level BPE (GPT-2, CLIP) writes as themselves; the others map to chr(256 + i)."""
    return [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]


def write_tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP text model and a byte-level BPE tokenizer without merges."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(b) for b in _printable_bytes()] + [chr(256 + i) for i in range(256 - len(_printable_bytes()))]
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=24,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_clip_text_encoder_end_to_end_edm(shapes_dir, tmp_path, cache):
    pytest.importorskip("transformers")
    clip = write_tiny_clip(tmp_path / "clip")
    run_dir = tmp_path / "run"
    r = run_py(*tiny_overrides(shapes_dir, cache, objective="edm"), "conditioning=text", TEMPLATES,
               "text_encoder=clip", f"text_encoder.pretrained={clip}", "guidance=cfg", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(k.startswith("condition.model.") for k in state["ema"]["model"])  # frozen CLIP is not saved
    assert "condition.proj.weight" in state["ema"]["model"]
    assert np.load(run_dir / "samples" / "samples.npz")["prompts"].tolist()[-1] == "a square"


@pytest.mark.slow
def test_clip_without_weights_is_one_sentence_before_any_work(shapes_dir, tmp_path, cache):
    run_dir = tmp_path / "run"
    r = run_py(*tiny_overrides(shapes_dir, cache), "conditioning=text", TEMPLATES, "text_encoder=clip",
               "text_encoder.pretrained=nobody/no-such-clip", f"hydra.run.dir={run_dir}")
    assert r.returncode != 0 and "no-such-clip" in r.stderr and one_sentence(r.stderr), r.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()
