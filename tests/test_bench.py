"""The speed benchmark: `dartprune bench` and its Python API on tiny models, the byte ceiling against a hand count,
the overhead formulas against the engine's own stats, and benchmarks/gpu_speed.py at a tiny size on the CPU.
No timing assertions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dartprune import DartConfig, attach
from dartprune.benchmarks.ceiling import (LLAMA_3_1_8B, Shapes, byte_ceiling, dart_state_bytes, decode_bytes,
                                          fit_fixed_cost, overhead_flops, shapes_decode_bytes,
                                          share_of_gain)
from dartprune.benchmarks.speed import BenchSettings, markdown_table, run_speed_benchmark, write_results
from tests.conftest import MINI
from dartprune.cli.main import main
from tests.tiny_models import CONFIGS, FAMILIES, random_ids, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Batch-1 decoding of a tiny model is far faster on one thread (and the machine has two shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROW_FIELDS = {"loop", "method", "sparsity", "ttft_ms", "tpot_ms", "tokens_per_s", "speedup", "speedup_from_min", "byte_ceiling", "share_of_gain",
              "share_of_gain_from_min", "peak_rss_mb", "peak_gpu_mb", "bytes_per_token", "new_tokens",
              "same_tokens_as_dense", "token_median_ms", "speedup_token_median", "share_of_gain_token_median",
              "runs", "paired", "ttft_over_dense", "max_step_over_median"}
HANDLE_FIELDS = {"retrace_count", "retrace_ms", "retrace_share_of_decode", "forced_retrace_ms", "forced_retrace_neurons",
                 "repeated_retrace_ms", "spread_retrace_steps", "executed_sparsity",
                 "state_bytes", "extra_bytes", "extra_share_of_model", "overhead_fraction", "keep_counts"}


def _check_result(result: dict, loops: list[str], methods: list[str], sparsities: list[float]) -> None:
    meta = result["meta"]
    assert meta["torch_threads"] == 1 and meta["repeats"] >= 1 and meta["loops"] == loops
    assert {"torch", "transformers", "dartprune"} <= set(meta["versions"])
    rows = result["rows"]
    expected = 1 + (len(methods) - 1) * len(sparsities)
    assert len(rows) == expected * len(loops)
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        for key in ("ttft_ms", "tpot_ms", "tokens_per_s"):
            spread = row[key]
            assert spread["min"] <= spread["median"] <= spread["max"] and spread["min"] > 0
        assert row["peak_rss_mb"]["max"] > 0
        assert row["paired"] == (row["loop"] == "native")    # native: a dense native loop decodes in lockstep
        if row["loop"] == "native" and row["method"] != "dense":
            spread = row["speedup_spread"]
            assert spread["min"] <= row["speedup"] == spread["median"] <= spread["max"]
        if row["loop"] == "native" and row["method"] == "dense":
            assert row["runs"] == (expected - 1) * meta["repeats"]
        if row["method"] == "dense":
            assert row["speedup"] == 1.0 and row["byte_ceiling"] == 1.0 and row["share_of_gain"] is None
            continue
        assert HANDLE_FIELDS <= set(row), HANDLE_FIELDS - set(row)
        if row["sparsity"] > 0:
            assert row["byte_ceiling"] > 1.0 and row["share_of_gain"] is not None
            assert row["state_bytes"] > 0 and row["extra_bytes"] == row["state_bytes"]   # no weights copied
            assert 0 < row["extra_share_of_model"] < 1
        else:
            assert row["byte_ceiling"] == 1.0 and row["share_of_gain"] is None
    for key, ceiling in result["byte_ceilings"].items():
        assert ceiling["dense_bytes_per_token"] >= ceiling["pruned_bytes_per_token"] > 0
    llama = result["overhead"]["llama_3_1_8b"]["state_bytes"]
    assert all(parts == dart_state_bytes(LLAMA_3_1_8B) for parts in llama.values())   # default ring, window
    for loop, fit in result["fixed_cost"].items():
        assert fit["points"] == sum(r["loop"] == loop for r in rows) and fit["bandwidth_gb_s"] > 0
        assert all(0 < b["share_bound"] <= 1 or fit["fixed_ms"] < 0 for b in fit["by_sparsity"].values())


def test_fixed_cost_fit_recovers_a_line_and_bounds_the_share():
    fixed, bandwidth = 5.0, 20.0                          # ms, GB/s
    dense, pruned = 540e6, 380e6
    points = [dense, pruned, 315e6]
    fit = fit_fixed_cost(points, [fixed + b / (bandwidth * 1e6) for b in points])
    assert fit.fixed_ms == pytest.approx(fixed) and fit.bandwidth_gb_s == pytest.approx(bandwidth)
    assert fit.r_squared == pytest.approx(1.0) and fit.points == 3
    speedup = (fixed + dense / 20e6) / (fixed + pruned / 20e6)
    assert fit.share_bound(pruned) == pytest.approx(share_of_gain(speedup, dense / pruned))
    limit = fit.fixed_ms_for_share(pruned, 0.9)
    at_limit = fit_fixed_cost(points, [limit + b / 20e6 for b in points])
    assert at_limit.share_bound(pruned) == pytest.approx(0.9)
    assert fit_fixed_cost([dense], [30.0]) is None and fit_fixed_cost([dense, dense], [30.0, 31.0]) is None
    assert fit_fixed_cost([dense, pruned], [20.0, 30.0]) is None      # slower with fewer bytes: no bandwidth


def test_bench_python_api_on_a_tiny_model_gives_every_field(tmp_path):
    model = tiny_model("llama")
    ids = random_ids(1, 24)
    settings = BenchSettings(methods=["dense", "dart", "griffin"], sparsities=[0.0, 0.5], prompt_len=24,
                             new_tokens=6, repeats=2, warmup=1, threads=1, loops=["hf", "native"],
                             config={"retrace_spread": 2}, ttft_pairs=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_speed_benchmark(model, ids, settings, label="tiny-llama")
    _check_result(result, ["hf", "native"], settings.methods, settings.sparsities)
    assert getattr(model, "dartprune_handle", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # every engine closed
    native_dart = [r for r in result["rows"] if r["loop"] == "native" and r["method"] == "dart" and r["sparsity"]]
    assert native_dart[0]["spread_retrace_max_over_median"] > 0
    carried = native_dart[0]["spread_retrace_steps"]       # a tiny model of 4 layers, spread over 2 tokens
    assert carried["count"] == 2 and 0 < carried["median_over_median"] <= carried["max_over_median"]
    dart = [r for r in result["rows"] if r["method"] == "dart" and r["sparsity"] == 0.5]
    assert all(r["forced_retrace_ms"] is not None and r["forced_retrace_ms"] > 0 for r in dart)
    assert all(isinstance(r["forced_retrace_neurons"], int) and r["repeated_retrace_ms"] > 0 for r in dart)
    for row in result["rows"]:                             # interleaved prompt pairs: the native pruned rows
        paired = row["ttft_paired"]
        assert (paired is not None) == (row["loop"] == "native" and row["method"] != "dense")
        if paired is not None:
            assert paired["pairs"] == 3 and 0 < paired["low"] <= paired["ratio"] <= paired["high"]
            assert paired["dense_ms"] > 0 and paired["pruned_ms"] > 0
    json_path, md_path = write_results(result, tmp_path, "speed_tiny")
    assert json.loads(json_path.read_text())["rows"][0]["method"] == "dense"
    table = md_path.read_text()
    assert "| native | dart | 0.5 |" in table and "byte ceiling at sparsity 0.5" in table
    assert "- time to first token (native, griffin, sparsity 0.5), 3 interleaved pairs" in table
    assert all(f"- {loop} loop, time per token = fixed" in table for loop in result["fixed_cost"])
    assert table == markdown_table(result)


def test_bench_skips_the_native_loop_for_other_families():
    model = tiny_model("gpt2")
    settings = BenchSettings(methods=["dense", "static"], sparsities=[0.5], new_tokens=3, repeats=1, warmup=0,
                             threads=1, loops=["hf", "native"])
    messages = []
    result = run_speed_benchmark(model, random_ids(1, 12), settings, progress=messages.append)
    assert {r["loop"] for r in result["rows"]} == {"hf"} and any("native loop skipped" in m for m in messages)


def test_bench_refuses_a_run_longer_than_the_context():
    model = tiny_model("llama")
    settings = BenchSettings(methods=["dense"], sparsities=[0.0], new_tokens=8, repeats=1, warmup=0, threads=1)
    with pytest.raises(ValueError, match="a prompt of 4090 tokens and 8 new tokens take 4098 positions; the model's context is 4096 tokens"):
        run_speed_benchmark(model, random_ids(1, 4090), settings)


def test_bench_cli_on_a_saved_tiny_model_writes_json_and_markdown(tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "results"
    code = main(["bench", "--model", str(folder), "--methods", "dense,dart,static", "--sparsity", "0,0.5",
                 "--prompt-len", "32", "--new-tokens", "5", "--dtype", "float32,bfloat16", "--repeats", "2",
                 "--warmup", "0", "--threads", "1", "--loops", "hf,native", "--out", str(out),
                 "--text", str(MINI / "gutenberg" / "harbour.txt"), "--offset", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "byte ceiling at sparsity 0.5" in captured.out and "| hf | dense | 0 |" in captured.out
    for dtype in ("float32", "bfloat16"):
        result = json.loads((out / f"speed_tiny-llama_{dtype}.json").read_text())
        assert result["meta"]["dtype"] == dtype and result["meta"]["prompt_len"] == 32
        _check_result(result, ["hf", "native"], ["dense", "dart", "static"], [0.0, 0.5])
        assert (out / f"speed_tiny-llama_{dtype}.md").read_text().startswith("### ")


def test_bench_cli_runs_a_calibrated_method_from_its_file(tmp_path, capsys):
    from dartprune.calibration.collect import calibrate
    from dartprune.data import load_text
    folder = tmp_path / "tiny-llama"
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = calibrate(model, tokenizer, "wanda-static", load_text(MINI / "gutenberg" / "kitchen.txt"),
                     tmp_path / "w.safetensors", samples=2, seq_len=32).path
    common = ["bench", "--model", str(folder), "--methods", "dense,wanda-static", "--sparsity", "0.5",
              "--prompt-len", "16", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--threads", "1",
              "--ttft-pairs", "0", "--text", str(MINI / "gutenberg" / "harbour.txt"), "--offset", "0"]
    assert main([*common, "--calibration-file", str(path), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "speed_tiny-llama_float32.json").read_text())["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("wanda-static", 0.5)]
    capsys.readouterr()
    common[common.index("dense,wanda-static")] = "dense,threshold"
    assert main([*common, "--calibration-file", str(path)]) == 2         # a wanda-static file, before loading
    assert "was made for method 'wanda-static', not 'threshold'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--methods", "dart,static"], "must include dense"),
    (["bench", "--methods", "dense,nope"], "unknown method"),
    (["bench", "--sparsity", "0.5,1.0"], "in [0, 1)"),
    (["bench", "--new-tokens", "1"], "--new-tokens"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--loops", "lean"], "unknown loop"),
    (["bench", "--set", "sparsity=0.3"], "with --sparsity, not --set"),
    (["bench", "--set", "window=abc"], "window must be an integer"),
    (["bench", "--out", __file__], "is a file"),
    (["bench", "--device", "cuda:99"], "cuda:99"),
    (["bench", "--device", "meta"], "runs on cpu or cuda"),
    (["bench", "--offset", "-5"], "--offset must be >= 0"),
    (["bench", "--methods", "dense,threshold"], "threshold need(s) --calibration-file"),
    (["bench", "--calibration-file", "x.safetensors"], "none of --methods needs one"),
    (["bench", "--methods", "dense,threshold", "--calibration-file", "x", "--set", "calibration_file=y"],
     "give the calibration file once"),
    (["bench", "--methods", "dense,wanda-static", "--calibration-file", "x.safetensors"],
     "calibration file x.safetensors not found"),
    (["bench", "--device", "mps"], "runs on cpu or cuda"),
])
def test_bench_cli_rejects_bad_arguments_before_loading(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_byte_ceiling_equals_a_hand_count_for_the_tiny_llama():
    config = CONFIGS["llama"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (32, 96, 4)
    model = tiny_model("llama")
    head_dim = 32 // 4
    attention = 32 * head_dim * 4 * 2 + 32 * head_dim * 2 * 2          # q and o: 4 heads; k and v: 2 kv heads
    ffn = 3 * 32 * 96
    norms = 2 * 32
    dense = 4 * (attention + ffn + norms) + 32 + 160 * 32 + 32          # final norm, lm_head, one embedding row
    assert (attention, ffn, dense) == (3072, 9216, 54592)
    counted = decode_bytes(model)
    assert counted.total == dense * 4 and counted.attention == 4 * attention * 4 and counted.ffn == 4 * ffn * 4
    keep = [48, 60, 30, 96]
    pruned = dense - sum(3 * 32 * (96 - k) for k in keep)
    assert decode_bytes(model, keep).total == pruned * 4
    assert byte_ceiling(model, keep) == pytest.approx(dense / pruned)
    assert byte_ceiling(model, [48] * 4) == pytest.approx(54592 / 36160)
    shapes = Shapes(layers=4, hidden=32, intermediate=96, vocab=160, heads=4, kv_heads=2, dtype_bytes=4)
    assert shapes_decode_bytes(shapes).total == dense * 4
    assert shapes_decode_bytes(shapes, keep).total == pruned * 4
    assert share_of_gain(1.25, 1.5) == pytest.approx(0.5) and share_of_gain(1.1, 1.0) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_bytes_counts_every_parameter_once(family):
    """Everything but the embedding tables is read once per token; of each table, one row."""
    model = tiny_model(family)
    counted = decode_bytes(model)
    head = model.get_output_embeddings().weight
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    unique = {id(p): p for p in model.parameters()}
    tables = [e for e in embeddings if e is not head]
    expected = sum(p.numel() * p.element_size() for p in unique.values())
    expected -= sum(t.numel() * t.element_size() for t in tables)
    expected += sum(t.shape[1] * t.element_size() for t in embeddings)
    assert counted.total == expected
    from dartprune.architectures import get_adapter
    adapter = get_adapter(model)
    ffn = 0
    for layer in adapter.layers():
        parts = adapter.ffn_parts(layer)
        ffn += sum(t.numel() * t.element_size() for t in (parts.gate, parts.up, parts.up_bias, parts.down,
                                                          parts.down_bias) if t is not None)
    assert counted.ffn == ffn > 0 and counted.attention > 0 and counted.lm_head == head.numel() * 4


def test_state_bytes_formula_matches_the_engine_and_llama_8b_sizes():
    model = tiny_model("llama")
    handle = attach(model, DartConfig(method="dart", sparsity=0.5))
    ids = random_ids(1, 20)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False)
    stats = handle.stats()[0]
    handle.detach()
    shapes = Shapes(layers=4, hidden=32, intermediate=96, vocab=160, heads=4, kv_heads=2, dtype_bytes=4)
    assert dart_state_bytes(shapes)["total"] == stats.state_bytes
    llama = dart_state_bytes(LLAMA_3_1_8B)                  # the default ring of 16 tokens
    assert llama["ring_ffn_inputs"] == 32 * 16 * 4096 * 2 and llama["scores"] == 32 * 14336 * 4
    assert llama["neuron_order"] == 32 * 14336 * 4 and llama["ring_attention"] == 16 * 4096 * 4
    assert llama["total"] < 10e6                            # the paper's claim for its state
    longer = dart_state_bytes(LLAMA_3_1_8B, DartConfig(ring_size=64))
    assert longer["total"] - llama["total"] == 48 * 4096 * (32 * 2 + 4)
    flops = overhead_flops(LLAMA_3_1_8B, prompt_tokens=512, new_tokens=256)
    assert 0 < flops["fraction"] < 0.01 and flops["retrace_in_dense_tokens"] > 1
    assert flops["tracing"] == pytest.approx(512 * 32 * (3 * 14336 + 12 * 4096))


def test_gpu_speed_script_runs_tiny_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "benchmarks" / "gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    result = module.main(["--tiny", "--device", "cpu", "--repeats", "2", "--whole-model", "--new-tokens", "6",
                          "--prompt-len", "16", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ffn"]["layers"] == 4 and len(saved["ffn"]["rows"]) == 2
    for row in saved["ffn"]["rows"]:
        assert row["max_abs_diff_vs_mask"] < 1e-2 and row["retrace_ms"]["median"] > 0 and row["ffn_ceiling"] > 1
        assert row["retrace_changed_neurons"] > 0
    assert [r["sparsity"] for r in saved["whole_model"]["rows"]] == [0.5, 0.7]
    assert saved["whole_model"]["handle_on_device"].startswith("ok")
    assert result["state_bytes"]["total"] > 0


def test_run_in_checkout_runs_that_checkouts_dartprune_and_refuses_another(tmp_path):
    """The scripts that compare commits run each in its own process on that checkout's code: a folder without
    dartprune would silently run the installed one, so it is refused."""
    from dartprune.benchmarks import run_in_checkout
    root = Path(__file__).resolve().parents[1]
    code = "import json, dartprune\nprint(json.dumps({'package': dartprune.__file__}))"
    assert Path(run_in_checkout(root, code)["package"]).resolve() == root / "dartprune" / "__init__.py"
    with pytest.raises(SystemExit, match="imported the dartprune of"):
        run_in_checkout(tmp_path, code)
    with pytest.raises(SystemExit, match="imported the dartprune of"):     # a folder above a checkout
        run_in_checkout(root.parent, code)
    with pytest.raises(SystemExit, match="ZeroDivisionError"):             # a failing process says why
        run_in_checkout(root, "1 / 0")


def test_attention_recorder_keeps_what_the_drift_monitor_is_shown():
    """The drift scripts study detectors on this record: every token's attention output of each monitored layer
    (the prompt's, which runs dense, equal to Hugging Face's), while the engine's monitor still sees it."""
    from dartprune.benchmarks import AttentionRecorder, teacher_force
    from dartprune.decode.model import NativeModel
    from dartprune.engine import Engine
    model = tiny_model("llama")
    ids = random_ids(1, 40)[0].tolist()
    outputs = {}
    hooks = [model.model.layers[layer].self_attn.register_forward_hook(
        lambda module, args, output, layer=layer: outputs.__setitem__(layer, output[0].reshape(-1, 32)))
        for layer in (1, 3)]
    with torch.no_grad():
        model(torch.tensor([ids[:16]]))
    for hook in hooks:
        hook.remove()
    engine = Engine(model, DartConfig(sparsity=0.5, detector="paper", window=4, monitored_layers=(1, 3)))
    recorder = AttentionRecorder(engine)
    try:
        logits = teacher_force(NativeModel(model, engine), ids, 16, 5)
        signals = recorder.take()
        assert engine.stats()[0].windows        # the monitor was fed too
    finally:
        engine.close()
    assert logits.shape == (39, 160) and [s.shape for s in signals] == [(39, 32), (39, 32)]
    for signal, layer in zip(signals, (1, 3)):
        torch.testing.assert_close(signal[:16], outputs[layer], rtol=1e-4, atol=1e-5)
    assert recorder.take() == []                # taken once
