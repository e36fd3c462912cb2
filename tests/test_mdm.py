"""MDM head (LingBot-Depth masked depth modelling on the visual tokens): token order, shapes, masking through the
shared mask module, losses, save/load, monocular mode, head-only training."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vlm_depth.depth import valid_mask
from vlm_depth.model.align import patchify
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.mdm_head import processor_order, token_grids
from vlm_depth.model.patch_mask import PatchState, mdm_patch_mask, patch_states
from vlm_depth.prompts.textualize import select_queries
from vlm_depth.train.mdm import SI_LAMBDA, MDMSpec, draw_patch_mask, label_maps, mdm_labels, mdm_loss

HEAD = dict(mdm_head=True, mdm_width=32, mdm_levels=2, mdm_blocks=1)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from vlm_depth.model.processor import DepthProcessor

    return DepthProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    """Tiny DepthVLM with an MDM head; `he_init` fusion so that depth changes the visual tokens from step 0."""
    from vlm_depth.model.depth_vlm import DepthVLM

    torch.manual_seed(0)
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=DepthBranchConfig(fusion="he_init", **HEAD)).eval()
    with torch.no_grad():  # away from the init (bias-only output), as after training
        for param in model.mdm_head.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def _rgb_depth(seed: int, height: int, width: int, density: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = np.where(rng.random((height, width)) < density, rng.uniform(0.5, 20.0, (height, width)), 0)
    return rgb, depth.astype(np.float32)


def _image_rows(processor) -> tuple[int, int]:
    ip = processor.image_processor
    return ip.patch_size, ip.merge_size


# ---------------------------------------------------------------------------------------------- tokens and shapes
def test_pre_merger_tokens_in_processor_order_reproduce_the_merged_output(model, processor):
    """The tower's last hidden state is in window order; un-permuted, the merger maps it to the tower's own output."""
    images = [_rgb_depth(1, 48, 64)[0], _rgb_depth(2, 300, 200)[0]]  # the second spans several attention windows
    inputs = processor(rgb=images)
    visual = model.model.visual
    with torch.no_grad():
        out = model.vision_outputs(inputs["pixel_values"], inputs["image_grid_thw"])
        rows = processor_order(out.last_hidden_state, inputs["image_grid_thw"], model.config.vision_config)
        torch.testing.assert_close(visual.merger(rows), out.pooler_output, rtol=0, atol=1e-6)
        assert not torch.allclose(visual.merger(out.last_hidden_state), out.pooler_output)  # the order matters


def test_token_grids_put_each_patch_at_its_image_position(processor):
    """Rows in the processor's patch order (align.patchify of a coordinate image) land at their (row, column)."""
    p, m = _image_rows(processor)
    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2]])
    rows = []
    for _, h, w in grid_thw.tolist():
        ys, xs = torch.meshgrid(torch.arange(h * p), torch.arange(w * p), indexing="ij")
        coords = torch.stack([ys // p, xs // p]).float()[None]  # (1, 2, H', W'): the patch index of every pixel
        rows.append(patchify(coords, p, m, 1).reshape(-1, 2, p * p)[:, :, 0])
    grids = token_grids(torch.cat(rows), grid_thw, m, merged=False)
    for grid, (_, h, w) in zip(grids, grid_thw.tolist()):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(grid, torch.stack([ys, xs]).float())


@pytest.mark.parametrize("tokens", ["pre_merger", "post_merger"])
def test_mdm_depth_has_input_size_and_is_positive_and_finite(tiny_ckpt, processor, tokens):
    from vlm_depth.model.depth_vlm import DepthVLM

    torch.manual_seed(0)
    cfg = DepthBranchConfig(fusion="he_init", **{**HEAD, "mdm_tokens": tokens})
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=cfg).eval()
    sizes = [(48, 64), (37, 100), (120, 90), (64, 48)]
    samples = [_rgb_depth(i, h, w) for i, (h, w) in enumerate(sizes)]
    inputs = processor(rgb=[s[0] for s in samples], depth=[s[1] for s in samples])
    with torch.no_grad():
        depth = model.mdm_depth(
            inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"], out_sizes=sizes
        )
        on_grid = model.mdm_depth(inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"])
    p = processor.image_processor.patch_size
    for d, g, size, (_, h, w) in zip(depth, on_grid, sizes, inputs["image_grid_thw"].tolist()):
        assert d.shape == size and g.shape == (h * p, w * p)
        assert torch.isfinite(d).all() and (d > 0).all() and torch.isfinite(g).all() and (g > 0).all()
    # An image's output does not depend on the rest of its batch (group norms only, no batch statistics).
    alone = processor(rgb=samples[0][0], depth=samples[0][1])
    with torch.no_grad():
        single = model.mdm_depth(
            alone["pixel_values"], alone["image_grid_thw"], alone["depth_maps"], out_sizes=sizes[:1]
        )
    torch.testing.assert_close(single[0], depth[0], rtol=1e-5, atol=1e-5)


def test_depth_beyond_the_range_is_clamped_but_still_pulled_back_by_the_loss():
    """Finite output even for absurd weights; the clamp passes gradients through, so training can recover."""
    from vlm_depth.model.mdm_head import LOG_DEPTH_RANGE, MDMHead

    torch.manual_seed(0)
    head = MDMHead(16, width=8, levels=1, blocks=1, init_depth=1e9)
    depth = head(torch.randn(1, 16, 3, 4), (20, 30))
    assert torch.isfinite(depth).all() and torch.allclose(depth, torch.tensor(math.exp(LOG_DEPTH_RANGE[1])))
    (depth - 2.0).abs().mean().backward()
    assert head.output.bias.grad.item() > 0  # a gradient step lowers the too-far prediction


# ------------------------------------------------------------------------------------------------------- masking
def test_masked_patches_contribute_nothing_to_the_depth_branch(model, processor):
    """Changing depth inside masked patches leaves the MDM output unchanged; inside a visible patch it changes it."""
    rgb, depth = _rgb_depth(3, 56, 56, density=1.0)  # 56 x 56 = the processor's grid: 4 x 4 patches of 14 px
    inputs = processor(rgb=rgb, depth=depth)
    masked_grid = torch.zeros(4, 4, dtype=torch.bool)
    masked_grid[1:3, 0:3] = True
    patch_mask = masked_grid.flatten()  # one bool per 14-px patch, row-major

    def run(d: np.ndarray) -> torch.Tensor:
        x = processor(rgb=rgb, depth=d)
        with torch.no_grad():
            return model.mdm_depth(x["pixel_values"], x["image_grid_thw"], x["depth_maps"], patch_mask)[0]

    base = run(depth)
    inside = depth.copy()
    inside[14:42, 0:42] = np.where(np.arange(42)[None] % 2, 0.0, 55.0)  # new values and holes, masked patches only
    torch.testing.assert_close(run(inside), base, rtol=0, atol=0)
    outside = depth.copy()
    outside[0:14, 42:56] = 55.0
    assert (run(outside) - base).abs().max() > 1e-4
    assert inputs["depth_maps"].shape[0] == 56 * 56 and patch_mask.shape[0] == 16


def test_mdm_masking_and_textualizer_share_patch_decisions(processor):
    """Same depth map, same seed: the training collator's MDM fields come from the textualizer's own split and the
    shared `patch_states` / `mdm_patch_mask` of the depth the branch sees, and every query's fill/keep mask value
    agrees with the state of its patch (nothing monkeypatched: the reference is recomputed from masks.py)."""
    from vlm_depth.data.sample import RGBDSample
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.prompts.template import PromptTemplate
    from vlm_depth.prompts.textualize import Textualizer
    from vlm_depth.train.collator import ExampleBuilder, QuerySpec

    p, _ = _image_rows(processor)
    rgb, depth = _rgb_depth(4, 56, 84, density=0.15)  # 56 x 84 is the processor's grid: no resize
    depth[:, 42:] = np.where(np.random.default_rng(5).random((56, 42)) < 0.9, 3.0, 0.0)  # denser right half
    depth[:28, :28] = 7.0  # fully valid patches ... and an empty block
    depth[28:, :28] = 0.0
    spec = MDMSpec()
    layout = ChatLayout(processor.tokenizer, Textualizer(PromptTemplate.load("paper")))
    query_spec = QuerySpec("sparse", queries_per_image=40, keep_ratio=0.5, holdout_ratio=0.2, mdm=spec)
    builder = ExampleBuilder(processor, layout, query_spec)
    for seed in range(5):
        example = builder(RGBDSample(rgb=rgb, depth=depth, name="x"), np.random.default_rng(seed), seed)

        # Reference: the textualizer's split and queries, then the shared mask functions, with the same rng stream.
        rng = np.random.default_rng(seed)
        shown, queries = select_queries(
            depth, None, label_source="sparse", queries_per_image=40, keep_ratio=0.5, holdout_ratio=0.2, rng=rng
        )
        assert example["is_fill"].tolist() == [q.kind == "fill" for q in queries]
        assert torch.equal(example["depth_maps"], processor(rgb=rgb, depth=shown)["depth_maps"])
        states = patch_states(valid_mask(shown), p)
        expected = mdm_patch_mask(states, rng, spec.mixed_keep_prob, spec.ratio_range)
        assert torch.equal(example["mdm_patch_mask"], torch.from_numpy(expected).flatten())
        assert expected[states == PatchState.EMPTY].all() and not expected.all()

        # The textualizer's mask value (keep = 1, fill = 0) agrees with the patch states of the same valid mask.
        for q in queries:
            assert states[q.y // p, q.x // p] != (PatchState.EMPTY if q.kind == "keep" else PatchState.VALID)
        # MDM labels are the held-out points: every fill query, with its label, and nothing the branch sees.
        labels = mdm_labels(depth, shown, None, "sparse")
        for q in queries:
            assert labels[q.y, q.x] == (np.float32(q.label) if q.kind == "fill" else 0)
        assert not (valid_mask(labels) & valid_mask(shown)).any()
        assert torch.equal(example["mdm_labels"], label_maps(labels, processor.image_processor))


def test_label_free_labels_are_the_held_out_points_and_never_read_the_ground_truth():
    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError("ground truth was read")

        def __array__(self, *args, **kwargs):
            raise AssertionError("ground truth was read")

    depth = np.array([[1.0, 0.0], [2.0, 3.0]], dtype=np.float32)
    shown = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    assert mdm_labels(depth, shown, Poisoned(), "sparse").tolist() == [[0, 0], [2, 0]]
    assert mdm_labels(depth, shown, np.array([[np.nan, 4.0], [0.0, 5.0]]), "gt").tolist() == [[0, 4], [0, 5]]


def test_mask_all_hides_every_patch_and_gives_the_monocular_map(model, processor):
    rgb, depth = _rgb_depth(6, 48, 64)
    inputs = processor(rgb=rgb, depth=depth)
    rng = np.random.default_rng(0)
    mask = draw_patch_mask(
        inputs["depth_maps"], inputs["image_grid_thw"], rng, processor.image_processor, MDMSpec(mask_all=True)
    )
    assert mask.all()
    monocular = processor(rgb=rgb, depth=np.zeros_like(depth))
    with torch.no_grad():
        all_masked = model.mdm_depth(
            inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"], mask, [(48, 64)]
        )[0]
        no_depth = model.mdm_depth(
            monocular["pixel_values"], monocular["image_grid_thw"], monocular["depth_maps"], None, [(48, 64)]
        )[0]
    assert all_masked.shape == (48, 64) and torch.isfinite(all_masked).all() and (all_masked > 0).all()
    torch.testing.assert_close(all_masked, no_depth, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------------- losses
class _Geometry:
    patch_size, merge_size, temporal_patch_size = 2, 2, 1


def _rows(maps: list[torch.Tensor]) -> torch.Tensor:
    """Label maps in the layout of `depth_maps`: each flattened row-major, concatenated."""
    return torch.cat([x.flatten() for x in maps])


def test_l1_loss_and_region_metrics_match_hand_computation():
    label = torch.tensor([[1.0, 0.0, 2.0, 4.0], [0.0, 3.0, 0.0, 8.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    pred = torch.full((4, 4), 2.0)
    patch_mask = torch.tensor([True, False, False, False])  # the top-left 2 x 2 patch (row-major patch grid)
    out = mdm_loss([pred], _rows([label]), patch_mask, torch.tensor([[1, 2, 2]]), _Geometry, "l1")
    # labelled: masked patch {1, 3} -> |1-2| + |3-2| = 2; visible {2, 4, 8, 1, 1, 1, 1} -> 0 + 2 + 6 + 4 = 12
    assert out["loss_sum"].item() == 14 and out["loss_weight"].item() == 9
    assert out["l1_masked_sum"].item() == 2 and out["n_masked"].item() == 2
    assert out["l1_visible_sum"].item() == 12 and out["n_visible"].item() == 7


def test_balanced_si_is_zero_when_exact_and_balances_visible_and_masked_regions():
    grid = torch.tensor([[1, 8, 8]])
    label = torch.linspace(1.0, 9.0, 256).reshape(16, 16)
    patch_mask = torch.zeros(64, dtype=torch.bool)
    patch_mask[:8] = True  # 8 of 64 patches masked (the first patch row): a small masked region

    def loss(pred: torch.Tensor) -> float:
        out = mdm_loss([pred], _rows([label]), patch_mask, grid, _Geometry, "balanced_si")
        return (out["loss_sum"] / out["loss_weight"]).item()

    in_masked = patch_mask.view(8, 8).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert loss(label) == pytest.approx(0.0, abs=1e-10)
    c = math.log(1.5)
    # A log-offset c everywhere: SI = (1 - lambda) c^2 in each region and scale.
    assert loss(label * 1.5) == pytest.approx((1 - SI_LAMBDA) * c * c, rel=1e-4)
    # The same offset in the small masked region only: half the weight, whatever the region's size.
    assert loss(torch.where(in_masked, label * 1.5, label)) == pytest.approx(0.5 * (1 - SI_LAMBDA) * c * c, rel=1e-4)
    assert loss(torch.where(in_masked, label, label * 1.5)) == pytest.approx(0.5 * (1 - SI_LAMBDA) * c * c, rel=1e-4)


# --------------------------------------------------------------------------------------------- save / load / readout
@pytest.fixture(scope="module")
def head_ckpt(model, processor, tmp_path_factory):
    """A full-weights vlm-depth checkpoint folder with an MDM head (and its processor)."""
    folder = tmp_path_factory.mktemp("mdm") / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _mdm_of(model, processor, samples, mask_seed: int | None = None) -> list[torch.Tensor]:
    inputs = processor(rgb=[s[0] for s in samples], depth=[s[1] for s in samples])
    mask = None
    if mask_seed is not None:
        rng = np.random.default_rng(mask_seed)
        mask = draw_patch_mask(inputs["depth_maps"], inputs["image_grid_thw"], rng, processor.image_processor)
    with torch.no_grad():
        return model.mdm_depth(inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"], mask)


def test_save_load_round_trip_restores_identical_mdm_outputs(model, processor, head_ckpt, tiny_ckpt, tmp_path):
    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.finetune import apply_lora

    samples = [_rgb_depth(7, 48, 64), _rgb_depth(8, 90, 120)]
    before = _mdm_of(model, processor, samples, mask_seed=0)
    loaded = DepthVLM.from_pretrained(head_ckpt).eval()
    assert loaded.depth_cfg == model.depth_cfg and loaded.depth_cfg.mdm_head
    for a, b in zip(before, _mdm_of(loaded, processor, samples, mask_seed=0)):
        assert torch.equal(a, b)

    # LoRA checkpoint: adapter + branch (head included) in depth_branch.safetensors.
    torch.manual_seed(1)
    lora = apply_lora(DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=DepthBranchConfig(**HEAD))).eval()
    lora_before = _mdm_of(lora, processor, samples)
    lora.save_pretrained(tmp_path / "lora")
    lora_loaded = DepthVLM.from_pretrained(tmp_path / "lora", base_model=str(tiny_ckpt)).eval()
    for a, b in zip(lora_before, _mdm_of(lora_loaded, processor, samples)):
        assert torch.equal(a, b)


def test_a_head_attached_to_a_checkpoint_without_one_is_saved_and_restored(tiny_ckpt, processor, tmp_path):
    from vlm_depth.errors import ModelError
    from vlm_depth.model.depth_vlm import DepthVLM

    plain = DepthVLM.from_pretrained(tiny_ckpt).eval()
    with pytest.raises(ModelError, match="no MDM head"):
        _ = plain.mdm_head
    torch.manual_seed(2)
    plain.attach_mdm_head(DepthBranchConfig(**{**HEAD, "mdm_tokens": "post_merger"}))
    assert plain.depth_cfg.mdm_head and plain.depth_cfg.mdm_tokens == "post_merger"
    samples = [_rgb_depth(9, 48, 64)]
    before = _mdm_of(plain, processor, samples)
    plain.save_pretrained(tmp_path / "ckpt")
    after = _mdm_of(DepthVLM.from_pretrained(tmp_path / "ckpt").eval(), processor, samples)
    assert torch.equal(before[0], after[0])


def test_complete_mdm_readout_keeps_input_pixels_and_fills_the_rest(model, processor):
    from vlm_depth.infer.complete import complete

    rgb, sparse = _rgb_depth(10, 60, 80, density=0.05)
    result = complete(model, processor, rgb, sparse, readout="mdm")
    valid = sparse > 0
    assert result.depth.shape == (60, 80) and result.depth.dtype == np.float32
    np.testing.assert_array_equal(result.depth[valid], sparse[valid])
    assert np.isfinite(result.depth).all() and (result.depth > 0).all()
    assert (result.uncertainty[valid] == 0).all() and np.isnan(result.uncertainty[~valid]).all()
    with torch.no_grad():
        inputs = processor(rgb, sparse)
        head = model.mdm_depth(
            inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"], None, [(60, 80)]
        )
    np.testing.assert_allclose(result.depth[~valid], head[0].numpy()[~valid], rtol=1e-6)
    monocular = complete(model, processor, rgb, None, readout="mdm")
    assert np.isfinite(monocular.depth).all() and (monocular.depth > 0).all()


def test_cli_complete_readout_mdm_end_to_end(head_ckpt, tiny_ckpt, tmp_path, capsys):
    from vlm_depth.cli import main
    from vlm_depth.data.depth_io import read_depth

    rgb, sparse = _rgb_depth(11, 48, 64, density=0.1)
    cv2.imwrite(str(tmp_path / "room.png"), rgb[..., ::-1])
    np.save(tmp_path / "room_depth.npy", sparse)
    out = tmp_path / "out"
    args = ["complete", "--model", str(head_ckpt), "--rgb", str(tmp_path / "room.png"), "--depth"]
    assert main([*args, str(tmp_path / "room_depth.npy"), "--readout", "mdm", "--out", str(out)]) == 0
    depth = np.load(out / "room_depth.npy")
    valid = sparse > 0
    assert depth.shape == (48, 64) and np.isfinite(depth).all() and (depth > 0).all()
    np.testing.assert_array_equal(depth[valid], sparse[valid])
    assert np.abs(read_depth(str(out / "room_depth.png"), scale=1000.0) - depth).max() <= 0.0005 + 1e-6
    # A checkpoint without a head: one clear error line, non-zero exit.
    capsys.readouterr()
    assert (
        main(
            [
                *args,
                str(tmp_path / "room_depth.npy"),
                "--readout",
                "mdm",
                "--out",
                str(tmp_path / "x"),
                "--model",
                str(tiny_ckpt),
            ]
        )
        == 2
    )
    assert "no MDM head" in capsys.readouterr().err


def test_eval_runs_the_mdm_readout_of_a_checkpoint(head_ckpt, tmp_path):
    import json

    from vlm_depth.data.folder import write_folder_sample
    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.eval.eval_config import EvalConfig
    from vlm_depth.eval.runner import run_eval

    for i in range(2):
        write_folder_sample(tmp_path / "data", generate_sample(i, 0, 48, 64))
    cfg = EvalConfig(
        dataset=f"folder:{tmp_path / 'data'}",
        protocol="uniform:50",
        model=str(head_ckpt),
        readout="mdm",
        out=str(tmp_path / "eval"),
        panels=0,
    )
    run_eval(cfg)
    (cell,) = (tmp_path / "eval").glob("*/*/*/metrics.json")
    metrics = json.loads(cell.read_text())
    assert metrics["readout"] == "mdm" and metrics["n_images"] == 2 and np.isfinite(metrics["mae"])


# ------------------------------------------------------------------------------------------------------- training
def _train_config(tiny_ckpt, out, mode: str, *overrides: str):
    from vlm_depth.config import parse_config
    from vlm_depth.train.train_config import TrainConfig

    args = [
        "--model", str(tiny_ckpt), "--out", str(out), "--finetune", "full",
        "--dataset", "synthetic:32?height=48&width=64&seed=0", "--cache_images", "true",
        "--val_dataset", "synthetic:4?height=48&width=64&seed=1", "--val_label_source", "gt",
        "--val_queries_per_image", "2",
        "--label_source", "gt", "--queries_per_image", "2", "--batch_size", "2",
        "--mdm_mode", mode, "--mdm_head", "true", "--mdm_width", "32", "--mdm_levels", "2",
        "--lr_branch", "1e-3", "--warmup_steps", "10", "--log_every", "50", "--seed", "0",
    ]  # fmt: skip
    return parse_config(TrainConfig, args + list(overrides))


@pytest.fixture
def one_thread():
    """The machine is shared: one intra-op thread is faster under contention (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_head_only_training_reduces_masked_pixel_l1_and_leaves_the_vlm_frozen(tiny_ckpt, tmp_path, one_thread):
    """200 CPU steps of the head alone (ground-truth labels, synthetic scenes) on the frozen tiny model: the L1 over
    held-out images' masked patches falls clearly; every other weight is unchanged; the checkpoint restores it."""
    from accelerate.utils import set_seed

    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.train.mdm import validate_mdm
    from vlm_depth.train.setup import build_val_batches, load_for_training
    from vlm_depth.train.trainer import run_train

    cfg = _train_config(tiny_ckpt, tmp_path / "run", "head_only", "--max_steps", "200", "--lr_branch", "3e-3")
    set_seed(cfg.seed)  # the initial model of run_train (same seed, same construction)
    initial, processor = load_for_training(cfg)
    layout = _layout(processor)
    val = build_val_batches(cfg, processor, layout)
    before = validate_mdm(initial, val, processor.image_processor)["val_mdm_l1_masked"]

    summary = run_train(cfg)
    after = summary["validation"]["val_mdm_l1_masked"]
    assert after < 0.5 * before, f"masked-pixel L1 on held-out images: {before:.3f} m before, {after:.3f} m after"
    assert summary["mdm_loss_last"] < summary["mdm_loss_first"]  # training loss, first vs last 20 steps
    assert summary["mae_first"] is None  # no text query ran: no text MAE (not a 0.0 that reads as a perfect fit)

    final = DepthVLM.from_pretrained(summary["final"]).eval()
    reloaded = validate_mdm(final, val, processor.image_processor)["val_mdm_l1_masked"]
    assert reloaded == pytest.approx(after, rel=1e-5)
    start, end = initial.state_dict(), final.state_dict()
    head = [k for k in end if k.startswith("depth_branch.mdm_head.")]
    assert head and any(not torch.equal(start[k], end[k]) for k in head)
    for key in set(end) - set(head):
        assert torch.equal(start[key], end[key]), f"{key} changed in head_only mode"


def _layout(processor):
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.prompts.template import PromptTemplate
    from vlm_depth.prompts.textualize import Textualizer

    return ChatLayout(processor.tokenizer, Textualizer(PromptTemplate.load("paper")))


def test_joint_training_logs_both_losses_and_trains_branch_and_head(tiny_ckpt, tmp_path, one_thread):
    """Joint mode, label-free, balanced SI loss, two accumulation micro-batches: text and MDM terms are logged and
    finite, and both the depth branch and the head move."""
    import json

    from accelerate.utils import set_seed

    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.train.setup import load_for_training
    from vlm_depth.train.trainer import run_train

    cfg = _train_config(
        tiny_ckpt, tmp_path / "joint", "joint", "--max_steps", "3", "--label_source", "sparse",
        "--mdm_loss", "balanced_si", "--grad_accum", "2", "--mdm_weight", "0.5", "--val_dataset", "",
    )  # fmt: skip
    set_seed(cfg.seed)
    init = {k: v.clone() for k, v in load_for_training(cfg)[0].state_dict().items()}
    summary = run_train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "joint" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["ce"] > 0 and row["mdm_loss"] > 0 and math.isfinite(row["mdm_l1_masked"])
        assert row["loss"] == pytest.approx(row["ce"] + 0.5 * row["mdm_loss"], rel=1e-9)
    trained = DepthVLM.from_pretrained(summary["final"]).state_dict()
    for prefix in ("depth_branch.mdm_head.", "depth_branch.fusion.out.", "model.language_model.layers.0."):
        keys = [k for k in trained if k.startswith(prefix)]
        assert keys and any(not torch.equal(trained[k], init[k]) for k in keys), prefix


@pytest.mark.slow
def test_joint_mdm_two_processes_match_one_process(tiny_ckpt, tmp_path):
    """DDP (2 processes over gloo, batch 1 each) and one process (batch 2) give the same first-step losses: the MDM
    term is normalised over the global batch and its forward goes through the one DDP-wrapped forward."""
    import os
    import subprocess
    import sys

    from runs import launch_two, training_log

    recipe = Path(__file__).resolve().parents[1] / "train" / "tiny-synthetic.yaml"
    common = ["train", "--config", str(recipe), "--model", str(tiny_ckpt), "--val_dataset", "", "--max_steps", "1"]
    common += ["--dataset", "synthetic:4?height=48&width=64&seed=0", "--mdm_mode", "joint", "--mdm_head", "true"]
    common += ["--mdm_width", "32", "--mdm_levels", "2", "--mdm_loss", "balanced_si"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = launch_two("ddp.yaml", [*common, "--batch_size", "1", "--out", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = [sys.executable, "-m", "vlm_depth", *common, "--batch_size", "2", "--out", str(tmp_path / "one")]
    done = subprocess.run(one, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {name: training_log(tmp_path / name)[0] for name in ("one", "two")}
    for key in ("loss", "ce", "mdm_loss", "mdm_l1_masked", "mdm_l1_visible"):
        assert rows["two"][key] == pytest.approx(rows["one"][key], abs=1e-4), key
    assert rows["two"]["grad_norm"] == pytest.approx(rows["one"]["grad_norm"], rel=1e-3)  # (fusion BatchNorm)
    # Same gradient, hence the same head after the step (the zero-initialised fusion makes its tokens independent
    # of the per-process BatchNorm statistics at step 1).
    from safetensors.torch import load_file

    one, two = (load_file(str(tmp_path / n / "final" / "depth_branch.safetensors")) for n in ("one", "two"))
    head = [k for k in one if ".mdm_head." in k]
    assert head
    for key in head:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)
