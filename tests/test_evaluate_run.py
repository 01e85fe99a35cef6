"""Evaluation end to end: `python run.py mode=evaluate ckpt=...` and the evaluation at the end of
a training run, on tiny configs in temporary folders, offline. The Inception path runs with a
stand-in weights file (the real architecture, randomly initialised), so the code that loads real
weights runs here without a download."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity
from conftest import read_metrics, run_py, tiny_overrides

from difflab.evaluate.extractors import FidelityImages, inception_extractor
from difflab.evaluate.metrics import FIDELITY_SEED, KEYS, fidelity_metrics

pytestmark = pytest.mark.slow

EVAL = ["eval.num_samples=12", "eval.classifier_steps=5", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir):
    """A tiny training run that ends with an evaluation of 12 samples."""
    base = tmp_path_factory.mktemp("eval")
    run_dir = base / "train"
    proc = run_py(*tiny_overrides(shapes_dir, base / "cache"), *EVAL, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, base / "cache"


@pytest.fixture(scope="module")
def stand_in_inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as its weights file would be.
    Its constructor always loads weights, so it is built once with loading switched off."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("stand-in", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    torch.save(net.state_dict(), folder / "inception-stand-in.pth")
    return folder / "inception-stand-in.pth"


def test_training_run_ends_with_an_evaluation(trained):
    run_dir, _ = trained
    m = read_metrics(run_dir)
    assert m["steps"] == 6 and m["trained"] is True
    assert m["fd_classifier"] > 0 and m["real_fd_classifier"] >= 0 and "kid_classifier" in m
    assert 0 <= m["class_accuracy"] <= 1 and m["real_class_accuracy"] is not None
    about = m["eval"]
    assert about["num_samples"] == 12 and about["checkpoint"] == m["checkpoint"]
    assert about["extractors"]["classifier"]["trained_now"] is True
    assert "skipped" in about["extractors"]["inception"]  # no weights in this machine's hub cache
    assert about["produced_by"]["fd_classifier"] == "classifier"
    assert m["eval_sampling_seconds"] > 0 and m["eval_feature_seconds"] > 0
    assert "fid" not in m
    log = (run_dir / "train.log").read_text()
    assert log.count("Inception metrics (FID, KID, IS, precision/recall) skipped") == 1
    assert "training the evaluation classifier" in log


def test_evaluate_mode_reproduces_the_training_runs_numbers(trained, tmp_path):
    """mode=evaluate on the trained checkpoint, with the training run's sampler settings and seed:
    the very numbers its own evaluation wrote, the classifier taken from the cache, and a missing
    Inception weights file skipped with one log line."""
    run_dir, cache = trained
    out = tmp_path / "evaluate"
    proc = run_py("mode=evaluate", f"ckpt={run_dir}/checkpoints/last.pt", *EVAL, "sampler.steps=5",
                  "sample.batch_size=4", "sample.num_images=4", "sample.gif=false", f"eval.inception_weights={tmp_path}/nope.pth", f"paths.cache_dir={cache}",
                  "device=cpu", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m, first = read_metrics(out), read_metrics(run_dir)
    assert m["stage"] == "evaluate" and m["checkpoint"] == str(run_dir / "checkpoints" / "last.pt")
    assert m["eval"]["checkpoint"] == m["checkpoint"] and m["eval"]["num_samples"] == 12
    assert m["num_images"] == 4 and (out / "samples" / "grid.png").is_file()
    for key in ("fd_classifier", "kid_classifier", "real_fd_classifier", "class_accuracy"):
        assert m[key] == first[key], key
    assert m["eval"]["extractors"]["classifier"]["trained_now"] is False
    assert m["eval"]["extractors"]["inception"] == {"skipped": f"eval.inception_weights={tmp_path}/nope.pth does not exist"}
    assert "fid" not in m
    assert (out / "train.log").read_text().count("skipped") == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/final/fd_classifier", "val/final/kid_classifier", "val/final/class_accuracy"} <= tags
    assert not [t for t in tags if t.startswith("val/final/real_") or t.endswith("_se")]  # the headline numbers alone
    assert acc.Scalars("val/final/fd_classifier")[0].value == pytest.approx(m["fd_classifier"])


def test_evaluate_mode_with_inception_weights(trained, stand_in_inception, tmp_path):
    """4 samples (Inception sees every image at 299 x 299, the cost of this test)."""
    run_dir, cache = trained
    out = tmp_path / "evaluate"
    proc = run_py("mode=evaluate", f"ckpt={run_dir}/checkpoints/last.pt", "eval.num_samples=4", "eval.batch_size=4",
                  "eval.extractors=[inception]", f"eval.inception_weights={stand_in_inception}", "sampler.steps=2",
                  "sample.num_images=0",
                  f"paths.cache_dir={cache}", "device=cpu", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(out)
    for key in ("fid", "kid", "kid_std", "inception_score", "precision_inception", "recall_inception", "real_fid",
                "real_inception_score", "fid_se", "precision_inception_se"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    inception = m["eval"]["extractors"]["inception"]
    assert inception["weights"] == str(stand_in_inception) and inception["name"].startswith("inception-v3-")
    assert m["eval"]["produced_by"]["fid"] == "inception" and "fd_classifier" not in m


def test_training_precision_and_inception_precision_keep_their_own_keys(stand_in_inception, shapes_dir, tmp_path):
    out = tmp_path / "train"
    proc = run_py(*tiny_overrides(shapes_dir, tmp_path / "cache"), "eval.num_samples=4", "eval.batch_size=4",
                  "eval.extractors=[inception]", f"eval.inception_weights={stand_in_inception}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(out)
    assert m["precision"] in ("float32", "bfloat16", "float16")  # the training's number format
    assert isinstance(m["precision_inception"], float) and isinstance(m["recall_inception"], float)
    about = m["provenance"]
    assert about["git_commit"] and isinstance(about["git_dirty"], bool) and about["torch"] == torch.__version__
    assert "cuda" in about and about["device_name"]


def test_inception_metrics_are_torch_fidelitys_calculate_metrics(stand_in_inception):
    """FID, KID, IS, precision and recall from difflab's extraction, as calculate_metrics (its
    cache off) gives them: 4 random images each."""
    ex = inception_extractor(stand_in_inception)
    rng = torch.Generator().manual_seed(0)
    generated, reference = (torch.randint(0, 256, (4, 3, 16, 16), generator=rng, dtype=torch.uint8) for _ in "ab")
    ours = fidelity_metrics(generated, reference, ex, torch.device("cpu"), 4, "/nonexistent-never-written")
    theirs = torch_fidelity.calculate_metrics(
        input1=FidelityImages(generated), input2=FidelityImages(reference), fid=True, kid=True, isc=True, prc=True,
        feature_extractor=ex.name, feature_extractor_weights_path=str(ex.weights), cuda=False, batch_size=4,
        save_cpu_ram=True, verbose=False, cache=False, kid_subset_size=2, isc_splits=4, rng_seed=FIDELITY_SEED)
    assert set(ours) == {*KEYS["inception"].values(), "fid_se", "kid_se", "precision_inception_se", "recall_inception_se"}
    for their_key, our_key in KEYS["inception"].items():
        assert ours[our_key] == pytest.approx(theirs[their_key], rel=1e-6, abs=1e-9), our_key


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_evaluate_without_checkpoint(tmp_path):
    _assert_clean_error(run_py("mode=evaluate", f"hydra.run.dir={tmp_path}/out"),
                        "error: mode=evaluate needs a trained model: add ckpt=")


@pytest.mark.parametrize("override,message", [
    ("eval.extractors=[clip]", "eval.extractors has clip, not an extractor"),
    ("eval.num_samples=-1", "eval.num_samples=-1 must be 0"),
    ("eval.num_samples=2", "eval.num_samples=2 must be 0 \\(no evaluation\\) or at least 4"),
    ("eval.batch_size=0", "eval.batch_size=0 must be positive"),
    ("eval.num_samples=0", "mode=evaluate with eval.num_samples=0 has nothing to measure"),
    ("eval.num_samples=4", "x.pt does not exist: point to a .pt file"),  # the checkpoint is missing
])
def test_bad_eval_values(override, message, tmp_path):
    """In-process, as run.py calls it: a bad eval.* value or a missing checkpoint stops before any
    work, in one sentence."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli import CONF_DIR
    from difflab.errors import UserError
    from difflab.runner import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=["mode=evaluate", f"ckpt.model={tmp_path}/x.pt", override])
    GlobalHydra.instance().clear()
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run(cfg, tmp_path)
