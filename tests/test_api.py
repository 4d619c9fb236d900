"""The public Python API (`import spin_diffusion as sd`): what it exports, its config rules, its one-line errors before
any work, `spin_loss` against the loss functions it wraps, and the API reference that scripts/docs.sh builds."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import math
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spin_diffusion as sd
from spin_diffusion import api, losses, training_loss
from spin_diffusion import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_a_bare_import_is_cheap_and_every_public_name_resolves():
    code = "import sys, spin_diffusion as sd; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert bare.stdout.strip() == "[]"  # names load on first use (PEP 562), not on import
    assert sd.__all__ == sorted(sd.__all__) and len(set(sd.__all__)) == len(sd.__all__)
    for name in sd.__all__:
        obj = getattr(sd, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"{name} has no docstring"
    assert set(api.__all__) <= set(sd.__all__)
    with pytest.raises(AttributeError, match="no attribute 'trainer_loop'"):
        sd.trainer_loop  # noqa: B018
    assert sd.spin_loss is training_loss.spin_loss and sd.RunConfig is config_lib.RunConfig


def test_help_lists_the_api():
    text = pydoc.render_doc(sd, renderer=pydoc.plaintext)
    for name in ("load_config", "spin", "sft", "dpo", "evaluate", "prepare_pickapic", "run_demo", "spin_loss"):
        assert f"\n    {name}(" in text, name
    for name in ("RunResult", "EvalResult", "LossOutput", "RunConfig"):
        assert f"class {name}(" in text, name


def test_load_config_follows_the_rules_of_set(tmp_path):
    as_set = ["train.learning_rate=3e-4", "loss.beta=[1000, 2000]", "eval.enabled=false"]
    cfg = sd.load_config(TINY, as_set, run_dir=tmp_path / "r")
    assert cfg == config_lib.replace(config_lib.load_config(TINY, as_set), run_dir=str(tmp_path / "r"))
    assert cfg.train.learning_rate == 3e-4 and cfg.loss.beta == (1000.0, 2000.0) and not cfg.eval.enabled
    as_mapping = {"train.learning_rate": 3e-4, "loss.beta": [1000, 2000], "eval.enabled": False}
    assert sd.load_config(TINY, as_mapping, run_dir=tmp_path / "r") == cfg
    # a RunConfig to start from: overrides apply on top of it, and a config round-trips unchanged
    assert sd.load_config(cfg) == cfg
    assert sd.load_config(cfg, {"train.max_steps": 9}).train.max_steps == 9
    assert sd.load_config() == config_lib.RunConfig()
    with pytest.raises(sd.SpinDiffusionError, match="train.learnin_rate"):
        sd.load_config(TINY, ["train.learnin_rate=1"])
    with pytest.raises(sd.SpinDiffusionError, match="key=value strings in a list"):
        sd.load_config(TINY, "train.max_steps=2")
    with pytest.raises(sd.SpinDiffusionError, match="config file not found"):
        sd.load_config(tmp_path / "missing.yaml")


def test_bad_input_raises_one_line_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(sd.SpinDiffusionError, match="`spin` runs the objectives trained in rounds .*, not dpo"):
        sd.spin(TINY, {"loss.objective": "dpo"}, run_dir=run_dir)
    with pytest.raises(sd.SpinDiffusionError, match="no run to resume"):
        sd.sft(run_dir=run_dir, resume=True)
    assert not run_dir.exists()
    with pytest.raises(sd.SpinDiffusionError, match="at least one"):
        sd.evaluate([], tmp_path / "prompts.txt", out_dir=tmp_path / "eval")
    with pytest.raises(sd.SpinDiffusionError, match="num_prompts must be >= 1"):
        sd.evaluate(["a"], tmp_path / "prompts.txt", num_prompts=0, out_dir=tmp_path / "eval")
    with pytest.raises(sd.SpinDiffusionError, match="no input shards"):
        sd.prepare_pickapic([], tmp_path / "prepared")
    with pytest.raises(sd.SpinDiffusionError, match="matches no files"):
        sd.prepare_pickapic(str(tmp_path / "train-*.parquet"), tmp_path / "prepared")
    with pytest.raises(sd.SpinDiffusionError, match="--scale must be > 0"):
        sd.run_demo(tmp_path / "demo", scale=0)
    with pytest.raises(sd.SpinDiffusionError, match="split must be one of"):
        sd.demo_prompts("holdout")
    assert not any(tmp_path.iterdir())
    assert len(sd.demo_prompts("test")) == 12 and not set(sd.demo_prompts("test")) & set(sd.demo_prompts("train"))


# ---------------------------------------------------------------------------------------------------------------
# spin_loss


def _batch(b: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target_w, target_l = torch.randn(b * k, 4, 3, 3, generator=g), torch.randn(b * k, 4, 3, 3, generator=g)
    ref_w = target_w + 0.5 * torch.randn(target_w.shape, generator=g)  # the seed's own draws, not the global RNG's
    ref_l = target_l + 0.5 * torch.randn(target_l.shape, generator=g)
    policy_w = (ref_w + 0.1 * torch.randn(ref_w.shape, generator=g)).requires_grad_()
    policy_l = (ref_l + 0.1 * torch.randn(ref_l.shape, generator=g)).requires_grad_()
    return policy_w, policy_l, ref_w, ref_l, target_w, target_l


@pytest.mark.parametrize("objective", ["spin_approx", "spin_exact", "dpo"])
def test_spin_loss_from_predictions_is_the_objectives_loss_on_the_errors(objective):
    b, k, beta = 3, 4, 800.0
    pw, pl, rw, rl, tw, tl = _batch(b, k)
    out = sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl, beta=beta, objective=objective,
                       timesteps_per_pair=k, sft_weight=0.3, dpop_lambda=0.5)  # fmt: skip

    def errors(pred, target):  # rows b*K + k -> [B, K]
        return losses.denoise_error(pred, target).reshape(b, k)

    policy = losses.DenoiseErrors(errors(pw, tw), errors(pl, tl))
    ref = losses.DenoiseErrors(errors(rw, tw), errors(rl, tl))
    fn = {"spin_approx": losses.spin_approx_loss, "spin_exact": losses.spin_exact_loss, "dpo": losses.dpo_loss}
    expected, metrics = fn[objective](policy, ref, beta, sft_weight=0.3, dpop_lambda=0.5)
    torch.testing.assert_close(out.per_sample, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    assert set(out.metrics) == set(metrics) >= {"margin", "accuracy", "sft_term", "dpop_term"}
    # the same from the errors themselves
    by_errors = sd.spin_loss(*policy, *ref, beta=beta, objective=objective, sft_weight=0.3, dpop_lambda=0.5)
    torch.testing.assert_close(by_errors.per_sample, expected)
    # the loss trains the policy only
    out.loss.backward()
    assert pw.grad is not None and pw.grad.abs().sum() > 0 and not rw.requires_grad


def test_the_policy_equal_to_its_reference_costs_log_2_and_exact_is_below_approx():
    pw, pl, rw, rl, tw, tl = _batch(2, 5, seed=1)
    same = sd.spin_loss(rw, rl, rw, rl, target_winner=tw, target_loser=tl, beta=1000.0, timesteps_per_pair=5)
    torch.testing.assert_close(same.loss, torch.tensor(math.log(2.0)))
    kw = dict(target_winner=tw, target_loser=tl, beta=1000.0, timesteps_per_pair=5)
    approx = sd.spin_loss(pw, pl, rw, rl, **kw)
    exact = sd.spin_loss(pw, pl, rw, rl, objective="spin_exact", **kw)
    assert (exact.per_sample <= approx.per_sample + 1e-6).all() and not torch.allclose(exact.loss, approx.loss)


def test_the_loser_guard_scales_only_the_losers_gradient_by_its_lambda():
    b, k = 4, 2
    pw, pl, rw, rl, tw, tl = _batch(b, k, seed=7)  # a batch where the guard cuts 2 of the 8 rows (λ ≥ 0.81)
    pl.data = pl.data + 0.3 * (pw.data - tw)  # loser residuals along the winner's: the guard has something to cut
    grads = {}
    for mu in (None, 0.5):
        w, l_ = pw.detach().clone().requires_grad_(), pl.detach().clone().requires_grad_()
        out = sd.spin_loss(w, l_, rw, rl, target_winner=tw, target_loser=tl, beta=1000.0, timesteps_per_pair=k,
                           loser_guard=mu)  # fmt: skip
        out.loss.backward()
        grads[mu] = (out, w.grad, l_.grad)
    (plain, w0, l0), (guarded, w1, l1) = grads[None], grads[0.5]
    torch.testing.assert_close(guarded.loss, plain.loss)  # the guard keeps every value
    torch.testing.assert_close(w1, w0)
    lam = losses.loser_guard_scale(pw.detach() - tw, pl.detach() - tl, 0.5)  # one per row
    assert ((lam > 0) & (lam < 1)).any()
    torch.testing.assert_close(l1, l0 * lam.view(-1, 1, 1, 1))
    torch.testing.assert_close(guarded.metrics["loser_guard_lambda"], lam.reshape(b, k).mean(dim=1))
    assert "loser_guard_lambda" not in plain.metrics


def test_spin_loss_refuses_bad_arguments():
    pw, pl, rw, rl, tw, tl = _batch(2, 1)
    with pytest.raises(ValueError, match="unknown objective 'spin'"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl, beta=1.0, objective="spin")
    with pytest.raises(ValueError, match="sft has no preference loss"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl, beta=1.0, objective="sft")
    with pytest.raises(ValueError, match="beta must be > 0"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl, beta=0.0)
    with pytest.raises(ValueError, match="give both target_winner and target_loser"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, beta=1.0)
    errors = [torch.rand(2) for _ in range(4)]
    with pytest.raises(ValueError, match="loser_guard needs predictions"):
        sd.spin_loss(*errors, beta=1.0, loser_guard=0.5)
    with pytest.raises(ValueError, match="not pairs × timesteps_per_pair=3"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl, beta=1.0, timesteps_per_pair=3)
    with pytest.raises(ValueError, match="differ in shape"):
        sd.spin_loss(pw, pl, rw, rl, target_winner=tw, target_loser=tl[:, :2], beta=1.0)


def test_the_loss_docstring_example_runs():
    result = doctest.testmod(training_loss, verbose=False)
    assert result.attempted >= 1 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------
# The API reference (scripts/docs.sh runs scripts/build_docs.py): CI fails when it does not build


def test_the_api_reference_builds_without_warnings(tmp_path):
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "scripts" / "build_docs.py")
    build_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_docs)
    pages = build_docs.build(tmp_path / "api")
    names = {p.relative_to(tmp_path / "api").as_posix() for p in pages}
    assert {"index.html", "spin_diffusion.html", "spin_diffusion/losses.html"} <= names
    page = (tmp_path / "api" / "spin_diffusion.html").read_text()
    for name in sd.__all__:
        assert f'id="{name}"' in page, name
    assert "trainer" not in {p.stem for p in pages}  # internal modules stay out


def test_the_cli_is_a_thin_layer_over_the_api(monkeypatch, capsys, tmp_path):
    from spin_diffusion.cli import main

    calls = []
    ran = api.RunResult(
        run_dir=tmp_path,
        objective="sft",
        config=config_lib.RunConfig(),
        iterations=1,
        exports={1: tmp_path / "iter_01" / "model"},
        metrics={1: {"shapes_judge": 0.25}},
        report=None,
        wall_seconds=3.0,
    )

    def record(name, result):
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or result

    for name in ("spin", "sft", "dpo"):
        monkeypatch.setattr(api, name, record(name, ran))
    monkeypatch.setattr(api, "evaluate", record("evaluate", api.EvalResult(out_dir=tmp_path, table="| the table |")))

    assert main(["sft", "-c", str(TINY), "--set", "train.max_steps=2", "-o", str(tmp_path), "--resume"]) == 0
    options = {"run_dir": tmp_path, "resume": True, "handle_signals": True}
    assert calls.pop() == ("sft", (TINY, ["train.max_steps=2"]), options)
    assert capsys.readouterr().out == ran.summary() + "\n"
    assert ran.summary().splitlines() == ["  iter 1: shapes_judge=0.25", f"finished in 3 s: {tmp_path}"]  # where, last
    assert main(["spin", "--exact"]) == 0
    options = {"run_dir": None, "resume": False, "exact": True, "handle_signals": True}
    assert calls.pop() == ("spin", (None, []), options)
    assert main(["evaluate", "-m", "a", "-m", "b", "-p", "p.txt", "--scorer", "clip", "--num-prompts", "3"]) == 0
    name, args, kwargs = calls.pop()
    assert (name, args) == ("evaluate", (["a", "b"], Path("p.txt")))
    assert (kwargs["scorers"], kwargs["num_prompts"], kwargs["baseline"]) == (["clip"], 3, 0)
    assert capsys.readouterr().out.endswith(f"| the table |\nresults: {Path('eval_out')}\n") and not calls
